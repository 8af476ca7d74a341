"""Encode every asset of a built folder with a trained SS-VAE into the d3s2-latents folder format."""
import json, os, sys, tempfile
from pathlib import Path
import numpy as np, torch
from d3s2.data.collate import collate_sparse
from d3s2.data.dataset import SparseSDFDataset
from d3s2.models.registry import from_pretrained
from d3s2.models.vae.sparse_sdf_vae import SparseSDFBatch

data, vae_dir, out, R = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
band = json.loads((Path(vae_dir) / "vae_task.json").read_text())["band"]
DEV = os.environ.get("DEV", "cuda")
model = from_pretrained(vae_dir).to(DEV).eval()
ds = SparseSDFDataset(data, R, split="train", with_image=False)
limit = int(sys.argv[5]) if len(sys.argv) > 5 else len(ds)
n_enc = min(limit, len(ds))
(out / "assets").mkdir(parents=True, exist_ok=True)
for i in range(n_enc):
    s = ds[i]
    c = collate_sparse([s])
    batch = SparseSDFBatch.from_blocks(c["sdf"], c["blocks"], tau=band).to(DEV)
    with torch.no_grad(), torch.autocast(DEV, torch.bfloat16, enabled=DEV == "cuda"):
        z, post = model.encode(batch.sdf, sample_posterior=False)
    coords = z.coords[:, 1:].cpu().numpy().astype(np.int16)
    order = np.lexsort((coords[:, 2], coords[:, 1], coords[:, 0]))
    path = out / "assets" / f"{s['name']}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz"); os.close(fd)
    np.savez(tmp, coords=coords[order], mean=post.mean.cpu().numpy()[order].astype(np.float16),
             logvar=post.logvar.cpu().numpy()[order].astype(np.float16))
    os.replace(tmp, path)
info = {"format": "d3s2-latents", "resolution": R, "latent_resolution": R // 8,
        "channels": int(post.mean.shape[1]), "band": band, "vae": os.path.basename(os.path.normpath(vae_dir)),
        "assets": n_enc, "split": "train"}
(out / "encoded.json").write_text(json.dumps(info, indent=2) + "\n")
print("encoded", n_enc)
