"""How far the SS-VAE's decoder can go: reconstruction metrics from the encoder's latent vs an optimised latent.

For each shape of a split, the latent is first the encoder's posterior mode (what ``d3s2 eval vae`` scores), then
that latent is optimised directly (Adam on the latent features, decoder frozen) to minimise the decoder's loss
``L_in + 0.1 L_ext + L_sharp`` against the shape's own targets: :func:`d3s2.models.vae.refine.refine_latent`, the
refinement ``--refine-steps`` runs (the best latent by that loss is kept). The optimised latent's metrics bound what the
decoder can express with one 16-channel latent per occupied 8³ block: if they reach the targets, the encoder
(or the KL weight, or training time) is what holds the VAE back; if not, the decoder or the latent size is.

``--band-reference`` also scores both against a reference built from the blocks that hold band voxels only (the
structure a ``latent_structure: band`` VAE decodes): the gap between the two references is what the band-closing
blocks (hole membranes) add. ``--iters 0`` skips the optimisation.

    python benchmarks/diagnose_vae_latent.py --data BUILD --weights DIR --split test --limit 16 --iters 200 \\
        --device cuda --out benchmarks/results/vae_latent_oracle.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from d3s2.data.collate import collate_sparse
from d3s2.data.dataset import SparseSDFDataset
from d3s2.models.registry import from_pretrained
from d3s2.models.vae.refine import refine_latent
from d3s2.models.vae.sparse_sdf_vae import PackedSDFBatch
from d3s2.models.vae.task import shape_metrics, target_mesh, unpacked
from d3s2.pipeline.extract import closed_mesh

KEYS = ["chamfer_l1", "fscore@0.01", "fscore@0.005", "normal_consistency", "volume_iou"]


def _mesh(model, z, resolution):
    with torch.no_grad():
        d = model.decode(z)
    return closed_mesh(d.coords[:, 1:], d.feats[:, 0].float(), z.coords[:, 1:], resolution)


def _sign_errors(model, z, full) -> float:
    """Fraction of band voxels whose decoded SDF has the wrong sign."""
    from d3s2.ops.conv.reference import lookup

    with torch.no_grad():
        d = model.decode(z)
    row = lookup(full.target.coords, d.coords, full.target.resolution).long()
    keep = (row >= 0) & full.in_band[row.clamp(min=0)]
    pred, want = d.feats[keep, 0], full.target.feats[row[keep], 0]
    return float(((pred > 0) != (want > 0)).float().mean())


def _band_block_reference(full, resolution):
    """The closed mesh of the targets of only the blocks that hold band voxels."""
    t = full.target
    blocks = torch.unique(full.sdf.coords[:, 1:] // 8, dim=0)
    g = resolution // 8
    key = lambda b: (b[:, 0].long() * g + b[:, 1]) * g + b[:, 2]  # noqa: E731
    keep = torch.isin(key(t.coords[:, 1:] // 8), key(blocks))
    return closed_mesh(t.coords[keep, 1:], t.feats[keep, 0].float(), blocks, resolution)


def diagnose(model, data: str, resolution: int, *, split: str, limit: int, iters: int, lr: float,
             samples: int, device: str, band_reference: bool = False, names: list[str] | None = None) -> dict:
    ds = SparseSDFDataset(data, resolution, split=split, with_image=False)
    picked = [ds.names.index(name) for name in names] if names else list(range(len(ds)))
    picked = picked[:limit] if limit else picked
    n = len(picked)
    if n == 0:
        raise ValueError(f"{data}: the {split} split is empty")
    band = float(json.loads((Path(data) / "build.json").read_text())["band"])
    shapes = []
    for i, index in enumerate(picked):
        t0 = time.perf_counter()
        c = collate_sparse([ds[index]])
        full = unpacked(PackedSDFBatch.pack(c["sdf"], c["blocks"], sharp=c["sharp"], tau=band).to(device))
        (ref,) = target_mesh(full)
        with torch.no_grad():
            z, _ = model.encode(full.sdf, sample_posterior=False, structure=full.block_structure())
        row = {"name": ds.names[index], "band_voxels": int(full.sdf.num_voxels), "latents": int(z.num_voxels),
               "encoded": shape_metrics(_mesh(model, z, resolution), ref, samples),
               "encoded_sign_errors": _sign_errors(model, z, full)}
        if band_reference:
            ref_band = _band_block_reference(full, resolution)
            row["band_reference_vs_reference"] = shape_metrics(ref_band, ref, samples)
            row["encoded_vs_band_reference"] = shape_metrics(_mesh(model, z, resolution), ref_band, samples)
        if iters == 0:
            shapes.append(row)
            print(f"{i + 1}/{n} {row['name']}: F@0.005 {row['encoded']['fscore@0.005']:.3f}", flush=True)
            continue
        refined = refine_latent(model, full, z, steps=iters, lr=lr)
        losses = refined.losses[:, 0].tolist()  # [iters + 1]
        curve = [{"iter": it, "loss": losses[it]} for it in sorted({0, iters // 4, iters // 2, iters})]
        zo = refined.latent
        row.update(optimised=shape_metrics(_mesh(model, zo, resolution), ref, samples),
                   optimised_sign_errors=_sign_errors(model, zo, full), curve=curve,
                   best_iter=int(refined.best_step[0]),
                   latent_shift_rms=float((zo.feats - z.feats).pow(2).mean().sqrt()),
                   seconds=time.perf_counter() - t0)
        shapes.append(row)
        print(f"{i + 1}/{n} {row['name']}: F@0.005 {row['encoded']['fscore@0.005']:.3f} -> "
              f"{row['optimised']['fscore@0.005']:.3f}, NC {row['encoded']['normal_consistency']:.3f} -> "
              f"{row['optimised']['normal_consistency']:.3f}, loss {losses[0]:.4f} -> {min(losses):.4f}",
              flush=True)
    kinds = [k for k in ("encoded", "optimised", "band_reference_vs_reference", "encoded_vs_band_reference")
             if k in shapes[0]]
    mean = {kind: {k: sum(s[kind][k] for s in shapes) / n for k in KEYS} for kind in kinds}
    for kind in ("encoded", "optimised"):
        if kind in mean:
            mean[kind]["sign_errors"] = sum(s[f"{kind}_sign_errors"] for s in shapes) / n
    return {"data": data, "resolution": resolution, "split": split, "shapes": n, "iters": iters, "lr": lr,
            "samples": samples, "mean": mean, "per_shape": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a built data folder (d3s2 data build)")
    parser.add_argument("--weights", required=True, help="SS-VAE export folder (config.json + safetensors)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=16, help="shapes (0 = the whole split)")
    parser.add_argument("--iters", type=int, default=200, help="Adam steps on the latent")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--samples", type=int, default=50_000, help="surface samples per metric")
    parser.add_argument("--band-reference", action="store_true",
                        help="also score against the reference of the band's blocks only")
    parser.add_argument("--names", nargs="*", help="only these shapes of the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="result JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = from_pretrained(args.weights, map_location=args.device).float().eval()
    report = diagnose(model, args.data, args.resolution, split=args.split, limit=args.limit, iters=args.iters,
                      lr=args.lr, samples=args.samples, device=args.device, band_reference=args.band_reference,
                      names=args.names)
    report.update(weights=args.weights, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__)
    for kind, m in report["mean"].items():
        print(f"{kind:>9}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if args.out:
        from d3s2.train.checkpoint import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
