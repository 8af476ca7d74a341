"""The end-to-end benchmark scripts run in their --tiny CPU mode and write their JSON + Markdown (the GPU runs
use the same code with full-size models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # reference ops, not interpreted kernels
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--device", "cpu", "--out-dir", str(out),
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    stem = script.removeprefix("bench_").removesuffix(".py")
    assert files == [f"{stem}_tiny_cpu.json", f"{stem}_tiny_cpu.md"]
    result = json.loads((out / f"{stem}_tiny_cpu.json").read_text())
    assert result["tiny"] and result["commit"] is not None
    return result


@pytest.fixture
def layouts(tmp_path) -> Path:
    """A layouts file in the latent_layouts_1024.npz format: int16 [N, 3] cells of the 128³ latent grid."""
    ax = np.arange(48, 80, 8)
    cells = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    shell = cells[(cells == 48).any(1) | (cells == 72).any(1)].astype(np.int16)
    path = tmp_path / "layouts.npz"
    np.savez(path, **{"64": shell})
    return path


@pytest.mark.slow
def test_bench_published_tiny(tmp_path, layouts):
    r = _run("bench_published.py", tmp_path / "out", "--steps", "1", "--no-warmup", "--layouts", str(layouts),
             "--layout", "64", "--resolutions", "128")
    run = r["runs"][0]
    assert r["refine"] and {"refine 64", "refine 128", "decode 128", "mesh 128"} <= set(run["seconds"])
    assert run["tokens"] == {"64": 8, "128": 56} and run["faces"] > 0 and run["watertight"]
    assert "| refine 128 |" in (tmp_path / "out" / "published_tiny_cpu.md").read_text()


@pytest.mark.slow
def test_bench_generate_tiny(tmp_path, layouts):
    r = _run("bench_generate.py", tmp_path / "out", "--steps", "1", "--repeats", "1", "--layouts", str(layouts),
             "--layout", "64", "--skip-index")
    assert [row["resolution"] for row in r["runs"]] == [64, 128]
    assert r["runs"][1]["tokens"] == {"64": 8, "128": 56} and r["runs"][1]["watertight"]


@pytest.mark.slow
def test_bench_vae_tiny(tmp_path):
    r = _run("bench_vae.py", tmp_path / "out")
    assert {"encode 32 icosphere", "decode 64 icosphere", "train 32", "train 64"} <= set(r["timings"])
    assert r["train_1024"][0]["decoded_voxels"] > 0 and np.isfinite(r["train_lo"]["loss"])
    sizes = r["meshes"][0]["resolutions"]
    assert sizes["64"]["decoded_voxels"] == 512 * sizes["64"]["latent_tokens"] > 0


@pytest.mark.slow
def test_profile_sparse_steps_tiny(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_sparse_steps.py"), "--tiny", "--device", "cpu",
           "--resolutions", "128", "--steps", "1", "--warmup", "0", "--profile-steps", "1", "--rows", "5",
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "profile_sparse_tiny_cpu.json").read_text())
    run = r["runs"][0]
    assert run["tokens"] > 0 and run["ms_per_step"] > 0
    assert "self_cpu_time_total" in run["profile"]["tables"]
    assert "## Profile at 128" in (out / "profile_sparse_tiny_cpu.md").read_text()
