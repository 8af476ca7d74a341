"""Pack what call 1 brings back: fp16 VAE export, latents of a subset, 256² renders of the same assets."""
import io, json, os, sys, tarfile
from pathlib import Path
import numpy as np
from d3s2.data.dataset import split_of

data, enc, vae, out, n_train = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
out.mkdir(parents=True, exist_ok=True)
# fp16 VAE export
from safetensors.torch import load_file, save_file
import torch
state = load_file(str(vae / "model.safetensors"))
pack = Path("/tmp/vae_fp16"); pack.mkdir(exist_ok=True)
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(pack / "model.safetensors"))
for f in ("config.json", "vae_task.json"):
    (pack / f).write_bytes((vae / f).read_bytes())
names = sorted(p.relative_to(enc / "assets").as_posix()[:-4] for p in (enc / "assets").rglob("*.npz"))
train = [n for n in names if split_of(n) == "train"][:n_train]
held = [n for n in names if split_of(n) != "train"]
keep = train  # held-out assets are evaluated where they are rebuilt, not shipped
print("assets", len(names), "kept", len(keep), "held-out", len(held))
tar = tarfile.open("/tmp/pack.tar", "w")
tar.add(str(pack), arcname="vae_fp16")
tar.add(str(enc / "encoded.json"), arcname="latents/encoded.json")
budget = int(os.environ.get("PACK_BYTES", "61000000"))
kept = 0
for n in keep:
    if tar.fileobj.tell() > budget:
        break
    kept += 1
    z = np.load(enc / "assets" / f"{n}.npz")
    buf = io.BytesIO(); np.savez_compressed(buf, coords=z["coords"], mean=z["mean"]); b = buf.getvalue()
    ti = tarfile.TarInfo(f"latents/assets/{n}.npz"); ti.size = len(b); tar.addfile(ti, io.BytesIO(b))
    a = np.load(data / "assets" / f"{n}.npz")
    png, off = a["render/png"], a["render/png_offsets"]
    nv = min(2, len(off) - 1)  # two of the views, original PNG bytes
    rec = {"name": n, "render/png": png[:off[nv]], "render/png_offsets": off[:nv + 1]}
    for k in a.files:
        if k.startswith("render/") and k not in rec:
            rec[k] = a[k][:nv] if a[k].ndim and a[k].shape[0] == len(off) - 1 else a[k]
        if k.startswith("normalize/"): rec[k] = a[k]
    buf = io.BytesIO(); np.savez(buf, **rec); b = buf.getvalue()
    ti = tarfile.TarInfo(f"renders/{n}.npz"); ti.size = len(b); tar.addfile(ti, io.BytesIO(b))
tar.close()
print("packed", kept, "train assets")
print("pack bytes", os.path.getsize("/tmp/pack.tar"))
