"""Summarise a `d3s2 data build` folder: per-asset times, projection to the whole source, failures.

    PYTHONPATH=src python benchmarks/summarize_build.py .data/corpus256 --total 4010
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from d3s2.data.build import read_manifest


def summarize(out: Path, total: int | None) -> str:
    settings = json.loads((out / "build.json").read_text())
    records = list(read_manifest(out).values())
    ok = [r for r in records if r["status"] == "ok"]
    failed = sorted((r for r in records if r["status"] != "ok"), key=lambda r: r["name"])
    lines = [f"settings: {json.dumps(settings)}", f"assets attempted: {len(records)}, ok: {len(ok)}, "
             f"failed: {len(failed)}", ""]
    if ok:
        lines += ["| per asset (ok) | median | mean | p90 | max |", "|---|---|---|---|---|"]
        for key in ("seconds", "seconds_sdf", "seconds_render", "seconds_load", "triangles"):
            a = np.array([r[key] for r in ok], float)
            stats = (np.median(a), a.mean(), np.percentile(a, 90), a.max())
            lines.append(f"| {key} | " + " | ".join(f"{x:.2f}" for x in stats) + " |")
        for res in settings["resolutions"]:
            v = np.array([r["voxels"][str(res)] for r in ok])
            b = np.array([r["blocks"][str(res)] for r in ok])
            lines.append(f"| voxels at {res}³ | {np.median(v):.0f} | {v.mean():.0f} | {np.percentile(v, 90):.0f} "
                         f"| {v.max()} |")
            lines.append(f"| 8³ blocks at {res}³ | {np.median(b):.0f} | {b.mean():.0f} | "
                         f"{np.percentile(b, 90):.0f} | {b.max()} |")
        sizes = [p.stat().st_size for p in (out / "assets").rglob("*.npz")]
        mean_s = float(np.mean([r["seconds"] for r in records]))
        lines += ["", f"asset file size: mean {np.mean(sizes) / 2**20:.2f} MiB over {len(sizes)} files"]
        if total:
            lines.append(f"projection for {total} assets on one worker: {total * mean_s / 3600:.1f} h "
                         f"(mean {mean_s:.1f} s per attempted asset), {total * np.mean(sizes) / 2**30:.1f} GiB")
    lines += ["", "failures:" if failed else "failures: none"]
    lines += [f"- `{r['name']}`: {r['error']}" for r in failed]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--total", type=int, default=None, help="assets in the whole source, for the projection")
    args = parser.parse_args()
    print(summarize(args.out, args.total))


if __name__ == "__main__":
    main()
