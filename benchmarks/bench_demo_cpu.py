"""CPU time of the demo pipeline at 256³ (configs/demo: dense VAE, dense DiT, sparse DiT, two small encoders, the demo
SS-VAE), per stage, with random weights or a trained pipeline folder.

The sparse stage's tokens come from a real asset of a 256³ build (its occupied 8³ blocks, passed as
``structure=``), so random weights do not decide the token count; the dense stage still runs. Random decoders
give noisy fields, so decode / mesh timings are upper bounds for trained models.

    python benchmarks/bench_demo_cpu.py --build /tmp/c20 --ss-vae-config configs/demo/ss_vae.yaml
    python benchmarks/bench_demo_cpu.py --build /tmp/c20 --weights OUT/pipeline      # a trained folder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def random_pipeline(ss_vae_config: str, steps: int):
    from d3s2.config import load_yaml
    from d3s2.models.registry import build_model
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, PipelineSettings, StageSettings

    def model(path: str):
        y = load_yaml(path)
        return build_model(y["model"]["name"], y["model"]["args"]), y

    torch.manual_seed(0)
    dvae, _ = model(str(ROOT / "configs/demo/dense_vae.yaml"))
    ddit, dy = model(str(ROOT / "configs/demo/dit_dense.yaml"))
    sdit, sy = model(str(ROOT / "configs/demo/dit_sparse.yaml"))
    vae, _ = model(ss_vae_config)
    denc = build_model("small_image_encoder", dy["conditioner"]["args"])
    senc = build_model("small_image_encoder", sy["conditioner"]["args"])
    stage = StageSettings(steps=steps, guidance_scale=3.0, shift=3.0)
    settings = PipelineSettings(dense=stage, sparse={256: stage}, occupancy_threshold=0.5)
    return ImageTo3DPipeline(None, ddit, dvae, {256: sdit}, {256: vae}, settings,
                             conditioners={"dense_dit": denc, "sparse_dit_256": senc})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="a 256³ build folder (structure and input image)")
    p.add_argument("--asset", default=None, help="asset name (default: the one with the median token count)")
    p.add_argument("--weights", default=None, help="a pipeline folder (default: random demo models)")
    p.add_argument("--ss-vae-config", default=str(ROOT / "configs/demo/ss_vae.yaml"))
    p.add_argument("--steps", type=int, default=20, help="Euler steps per stage (random models)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the timings as JSON here")
    args = p.parse_args()

    from d3s2.data.dataset import SparseSDFDataset
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

    torch.set_num_threads(args.threads)
    ds = SparseSDFDataset(args.build, 256, split=None, with_blocks=False, with_image=True, view=0)
    counts = ds.token_counts
    index = ds.names.index(args.asset) if args.asset else int(np.argsort(counts)[len(counts) // 2])
    item = ds[index]
    coords = torch.unique(item["coords"] // 8, dim=0).to(torch.int32)
    image = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # RGBA
    pipe = ImageTo3DPipeline.from_pretrained(args.weights) if args.weights else random_pipeline(args.ss_vae_config,
                                                                                                   args.steps)
    load_before = os.getloadavg()[0]  # a shared machine's load inflates every timing
    t0 = time.perf_counter()
    mesh = pipe(image, device="cpu", progress=False, structure={256: coords})
    total = time.perf_counter() - t0
    result = {"asset": ds.names[index], "tokens": int(coords.shape[0]), "threads": args.threads,
              "steps": {"dense": pipe.settings.dense.steps, "sparse": pipe.settings.stage(256).steps},
              "weights": args.weights or "random", "seconds": {k: round(v, 2) for k, v in
                                                              pipe.last_timing.seconds.items()},
              "total_s": round(total, 2), "faces": int(len(mesh.faces)),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
