"""``d3s2 data build``: meshes → sparse SDF + renders, one file per asset (see :mod:`d3s2.data.build`);
``d3s2 data encode``: a built folder → SS-VAE latents, one file per asset (see :mod:`d3s2.data.encode`)."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 256,512, got {text!r}") from None


def _build(args: argparse.Namespace) -> int:
    from d3s2.data.build import BuildConfig, build, parse_shard, resolve_sources, select

    config = BuildConfig(resolutions=tuple(args.resolutions), views=args.views, image_size=args.image_size,
                         band=args.band, scale=args.scale, seed=args.seed, device=args.device)
    shard = parse_shard(args.shard)
    assets = resolve_sources(args.sources, corpus_path=args.corpus)
    mine = select(assets, shard=shard, subset=args.subset, seed=args.seed)
    print(f"{len(assets)} assets found; {len(mine)} in shard {shard[0]}/{shard[1]}"
          + (f" of a {args.subset}-asset subset" if args.subset is not None else ""))
    summary = build(mine, args.out, config, workers=args.workers, shard=shard, progress=not args.no_progress)
    print(f"built {summary.built}, skipped {summary.skipped} (already done), failed {len(summary.failed)} "
          f"in {summary.seconds:.1f} s -> {args.out}")
    for name, reason in sorted(summary.failed.items()):
        print(f"  FAILED {name}: {reason}")
    return 1 if summary.failed else 0


def _encode(args: argparse.Namespace) -> int:
    from d3s2.data.encode import encode_folder

    summary = encode_folder(args.data, args.vae, args.out, resolution=args.resolution, device=args.device,
                            batch_tokens=args.batch_tokens, progress=not args.no_progress,
                            refine_steps=args.refine_steps, refine_lr=args.refine_lr, band=args.band)
    print(f"encoded {summary.encoded}, skipped {summary.skipped} (already done), failed {len(summary.failed)} "
          f"in {summary.seconds:.1f} s -> {args.out}")
    for name, reason in sorted(summary.failed.items()):
        print(f"  FAILED {name}: {reason}")
    return 1 if summary.failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    from d3s2.models.vae.cli import add_refine_arguments

    p = sub.add_parser("data", help="build training data from meshes")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    b = data_sub.add_parser(
        "build", help="meshes -> sparse SDF at several resolutions + conditioning renders",
        description="SOURCE: a folder (every .obj/.ply/.stl/.off/.glb/.gltf/.pmd below it), a glob, a mesh file, "
                    "or the built-in 0 A.D. corpus: '0ad' or '0ad:<category>' (gaia, props, skeletal, structural, "
                    "temp, test). Re-running skips finished assets and retries failed ones. Exits with 1 when an asset "
                    "failed in this run (after the summary, which names each failure), as `d3s2 data encode` does.")
    b.add_argument("sources", nargs="+", metavar="SOURCE")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--resolutions", type=_ints, default=[256, 512], help="SDF resolutions (default 256,512)")
    b.add_argument("--views", type=int, default=8, help="renders per asset (default 8; 0 = none)")
    b.add_argument("--image-size", type=int, default=518, help="render size in pixels (default 518)")
    b.add_argument("--band", type=float, default=1 / 128, help="narrow band |sdf| < band in [-1,1] units (1/128)")
    b.add_argument("--scale", type=float, default=0.95, help="normalise meshes into [-scale, scale]^3 (0.95)")
    b.add_argument("--seed", type=int, default=0, help="camera (and --subset) seed")
    b.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    b.add_argument("--shard", default="0/1", help="build only part i of n: 'i/n' (default 0/1)")
    b.add_argument("--subset", type=int, default=None, metavar="K",
                   help="only a deterministic random subset of K assets (before sharding)")
    b.add_argument("--corpus", default=None, help="0 A.D. corpus npz (default $D3S2_0AD_NPZ or "
                                                  "../shared/data/0ad_meshes.npz)")
    b.add_argument("--device", default="cpu", help="device for the SDF (cpu, cuda)")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a log line every 30 s)")
    b.set_defaults(func=_build)
    e = data_sub.add_parser(
        "encode", help="a built data folder -> SS-VAE latents per asset (the DiTs' training data)",
        description="Encode every asset of a built folder with a trained SS-VAE (`d3s2 train vae` export). "
                    "Writes OUT/encoded.json and OUT/assets/<name>.npz (coords, mean, logvar); re-running skips "
                    "finished assets.")
    e.add_argument("--data", required=True, help="built data folder (d3s2 data build)")
    e.add_argument("--vae", required=True,
                   help="SS-VAE folder (config.json, model.safetensors; vae_task.json gives its band)")
    e.add_argument("--band", type=float, default=None,
                   help="SDF band of the VAE's inputs (default: vae_task.json's, else 1/128); given explicitly, "
                        "a data folder built with a far-off band is encoded anyway")
    e.add_argument("--resolution", type=int, default=256, help="SDF resolution to encode (default 256)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e.add_argument("--batch-tokens", type=int, default=500_000, help="band voxels per encoder batch (500000)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a log line every 30 s)")
    add_refine_arguments(e)
    e.set_defaults(func=_encode)
