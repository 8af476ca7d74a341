"""Published Direct3D-S2 checkpoints → d3s2 modules: strict loading of every component of both versions from
synthetic checkpoints with the exact published keys/shapes, forward passes, and one test per layout convention."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from d3s2.models.dit import ConditionTokens
from d3s2.pipeline import published as pub
from d3s2.sparse import SparseTensor

from .synthetic import PUBLISHED, VERSIONS, entries, random_state_dict, reference_ape, write_published_folder

COMPONENTS = list(pub.COMPONENTS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One synthetic published folder per version (v1.0 and v1.1 share all files but the sparse ones)."""
    root = tmp_path_factory.mktemp("published")
    out = {"v1.1": write_published_folder(root / "v1.1", "v1.1", COMPONENTS)}
    sparse = ["sparse_vae_512", "sparse_dit_512", "sparse_vae_1024", "sparse_dit_1024"]
    out["v1.0"] = write_published_folder(root / "v1.0", "v1.0", sparse, seed=10)
    for file in ("model_dense.ckpt", "model_refiner.ckpt", "model_refiner_1024.ckpt"):
        (out["v1.0"] / file).symlink_to(out["v1.1"] / file)
    return out


_LOADED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _LOADED.clear()


def loaded(folders, version: str, name: str) -> torch.nn.Module:
    """The component loaded in float16 (cached; tests must not modify it): the stored fp16 tensors stay views of
    the memory-mapped checkpoint (no copies), only the small fp32 ones (norms, pos_emb) are converted."""
    if (version, name) not in _LOADED:
        _LOADED[version, name] = pub.load_component(folders[version], name, dtype=torch.float16)
    return _LOADED[version, name]


def fp32(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a (small) submodule of a cached model."""
    return copy.deepcopy(module).float()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", COMPONENTS)
def test_component_loads_strictly_every_key_in_place(folders, version, name):
    model = loaded(folders, version, name)
    info = PUBLISHED[version][name]
    ckpt = pub.load_checkpoint(folders[version] / info["file"])[info["key"]]
    assert [k for k, _, _ in entries(version, name)] == list(ckpt)
    back = pub.to_published(model)
    assert set(back) == set(ckpt)  # every key, nothing extra
    for key, value in ckpt.items():
        assert back[key].shape == value.shape and back[key].dtype == torch.float16, key
        # Each tensor is a window at a random offset of shared random storage: a strided sample pins placement.
        step = max(1, value.numel() // 512)
        assert torch.equal(back[key].flatten()[::step], value.flatten()[::step].half()), key
    assert sum(t.numel() for t in model.state_dict().values()) == info["state_dict_numel"]
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert not model.training


def test_load_published_subset_device_and_dtype(folders):
    models = pub.load_published(folders["v1.1"], ["refiner_1024"], device="meta", dtype=torch.bfloat16)
    m = models["refiner_1024"]
    assert {(p.dtype, p.device.type) for p in m.parameters()} == {(torch.bfloat16, "meta")}
    assert "refiner_1024" in models and "dense_dit" not in models
    with pytest.raises(KeyError, match="not loaded"):
        models["dense_dit"]
    assert models.defaults.version == "v1.1"
    assert pub.available_components(folders["v1.1"]) == COMPONENTS


# ------------------------------------------------------------------------------------------------ forwards
def test_dense_vae_forward_full_width(folders):
    m = pub.load_component(folders["v1.1"], "dense_vae")  # float32: CPU float16 3D convs are ~10x slower
    occ = torch.zeros(1, 1, 4, 4, 4)
    occ[:, :, 1:3, 0:3, 1:4] = 1
    with torch.no_grad():
        z, _ = m.encode(occ, sample_posterior=False)
        logits = m.decode(z)
    assert z.shape == (1, 8, 1, 1, 1) and logits.shape == (1, 1, 4, 4, 4) and torch.isfinite(logits).all()
    assert m.occupied_coords(logits, pub.read_defaults(pub.read_config(folders["v1.1"])).occupancy_threshold
                             ).shape[1] == 4


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["sparse_vae_512", "sparse_vae_1024"])
def test_sparse_vae_forward_full_width(folders, version, name):
    m = pub.load_component(folders[version], name)
    g = torch.Generator().manual_seed(0)
    coords = torch.tensor([[x, y, z] for x in range(20, 28) for y in range(20, 28) for z in (22, 23, 30)])
    sdf = SparseTensor.from_samples([coords], [torch.rand(len(coords), 1, generator=g) * 2 - 1], resolution=64)
    chunk = pub.read_defaults(pub.read_config(folders[version])).sparse_1024_decode_chunk if "1024" in name else 0
    with torch.no_grad():
        z, _ = m.encode(sdf, sample_posterior=False)
        out = m.decode(z, chunk_size=chunk)
    assert z.feats.shape == (z.num_voxels, 16) and z.resolution == 8
    assert out.feats.shape == (512 * z.num_voxels, 1) and out.feats.abs().max() <= 1


def test_dense_dit_forward_single_block(folders):
    """The 555 M-parameter dense DiT: embeddings, one full-width block and the head on a few tokens."""
    m = loaded(folders, "v1.1", "dense_dit")
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 17, 300, 4095])
    x = torch.randn(1, 4, 8, generator=g)
    cond = ConditionTokens(torch.randn(1, 6, 1024, generator=g))
    with torch.no_grad():
        h = fp32(m.input_layer)(x) + m.pos_emb[rows].float()
        h = fp32(m.blocks[0])(h, fp32(m.t_embedder)(torch.tensor([500.0])), cond)
        out = fp32(m.out_layer)(F.layer_norm(h, h.shape[-1:]))
    assert out.shape == (1, 4, 8) and torch.isfinite(out).all() and out.abs().sum() > 0


def _tokens(resolution: int, n: int = 24, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(16**3, generator=g)[:n]  # inside two-by-two 8³ blocks near the origin
    coords = torch.stack([flat // 256, flat // 16 % 16, flat % 16], 1) + resolution // 2 - 8
    return SparseTensor.from_samples([coords], [torch.randn(n, 16, generator=g)], resolution=resolution)


def _condition(sparse: bool) -> ConditionTokens:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 9, 1024, generator=g)
    if not sparse:
        return ConditionTokens(tokens)
    coords = torch.tensor([[0, 0, 1]] * 5 + [[3, 4, 0], [5, 4, 0], [6, 6, 0], [0, 0, 0]])[None]
    mask = torch.tensor([[True] * 8 + [False]])
    return ConditionTokens(tokens, mask, coords)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["sparse_dit_512", "sparse_dit_1024"])
def test_sparse_dit_forward_reduced_depth(folders, version, name):
    """The ~0.5 B sparse DiT with SSA: all embeddings and heads, its first two blocks (unshifted and shifted
    windows), full width, on a few tokens."""
    m = loaded(folders, version, name)
    with torch.device("meta"):
        small = type(m)(dataclasses.replace(m.config, num_blocks=2))
    state = {k: v.float() for k, v in m.state_dict().items() if not k.startswith("blocks.") or
             int(k.split(".")[1]) < 2}
    small.load_state_dict(state, strict=True, assign=True)
    x = _tokens(m.config.resolution)
    with torch.no_grad():
        out = small(x, torch.tensor([700.0]), _condition(m.config.sparse_conditions))
    assert out.feats.shape == (24, 16) and torch.isfinite(out.feats).all() and out.feats.abs().sum() > 0


def _shell(resolution: int, n: int, channels: int = 1, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(resolution**3, generator=g)[:n]
    c = torch.stack([flat // resolution**2, flat // resolution % resolution, flat % resolution], 1)
    return SparseTensor.from_samples([c], [torch.rand(n, channels, generator=g) * 2 - 1], resolution=resolution)


def test_refiner_forward_full_width_tiny_patches(folders):
    m = pub.load_component(folders["v1.1"], "refiner")  # float32
    sdf = _shell(8, 200)
    feats = torch.randn(200, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = m(sdf, feats, patch_size=8, patch_stride=8)
    assert out.shape == (1, 1, 8, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1


def test_refiner_1024_forward_full_width_tiny_patches(folders):
    m = pub.load_component(folders["v1.1"], "refiner_1024")  # float32
    sdf = _shell(16, 400)
    with torch.no_grad():
        grid = m(sdf, patch_size=8, patch_stride=8)
    c = sdf.coords.long()
    assert grid.shape == (1, 1, 16, 16, 16) and grid.dtype == sdf.dtype
    torch.testing.assert_close(grid[0, 0, c[:, 1], c[:, 2], c[:, 3]], sdf.feats[:, 0])
    mask = torch.ones_like(grid, dtype=torch.bool)
    mask[0, 0, c[:, 1], c[:, 2], c[:, 3]] = False
    assert set(grid[mask].unique().tolist()) <= {-1.0, 1.0}


# ------------------------------------------------------------------------------------------------ conventions
def test_torchsparse_3x3x3_kernel_equals_conv3d_with_published_orientation(folders):
    """A published [27, C_in, C_out] kernel (v1.0 SSA compression conv), loaded, equals F.conv3d with
    w[o, i, dx+1, dy+1, dz+1] = kernel[(dx+1) + 3(dy+1) + 9(dz+1), i, o] reading the input at p + (dx, dy, dz)."""
    m = loaded(folders, "v1.0", "sparse_dit_512")
    name = "blocks.0.self_attn.compression_key.out_layers.0"
    raw = pub.load_checkpoint(folders["v1.0"] / "model_sparse_512.ckpt")["dit"][f"{name}.conv.kernel"].float()
    conv = m.get_submodule(name)  # fp16 parameters, computed in the input's float32
    r = 5
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(1, 64, r, r, r, generator=g)
    dense[:, :, 1, 2, 3] = 0  # voxels absent from the sparse tensor read as zeros
    keep = torch.ones(r, r, r, dtype=torch.bool)
    keep[1, 2, 3] = False
    coords = keep.nonzero()
    x = SparseTensor.from_samples([coords], [dense[0, :, coords[:, 0], coords[:, 1], coords[:, 2]].T], resolution=r)
    w = torch.empty(64, 64, 3, 3, 3)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                w[:, :, dx + 1, dy + 1, dz + 1] = raw[(dx + 1) + 3 * (dy + 1) + 9 * (dz + 1)].T
    # F.conv3d is a cross-correlation: out[p] = sum_o w[o] · in[p + o - 1], i.e. input at p + (dx, dy, dz).
    expect = F.conv3d(dense, w, conv.bias.detach().float(), padding=1)[0, :, coords[:, 0], coords[:, 1], coords[:, 2]].T
    with torch.no_grad():
        got = conv(x).feats
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_torchsparse_1x1_kernel_is_input_major(folders):
    """A published 2-D [C_in, C_out] kernel (v1.1 SSA compression) acts as x @ kernel + bias."""
    m = loaded(folders, "v1.1", "sparse_dit_512")
    name = "blocks.3.self_attn.compression_value.act_layers.0"
    sd = pub.load_checkpoint(folders["v1.1"] / "model_sparse_512.ckpt")["dit"]
    kernel, bias = sd[f"{name}.conv.kernel"].float(), sd[f"{name}.conv.bias"].float()
    assert kernel.shape == (64, 64)
    x = _shell(8, 10, channels=64)
    with torch.no_grad():
        got = m.get_submodule(name)(x).feats
    torch.testing.assert_close(got, x.feats @ kernel + bias)


def _manual_attention(q, k, v):
    """q [T, H, D], k/v [L, H, D]: per-head softmax attention, heads concatenated head-major."""
    s = torch.einsum("thd,lhd->htl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("htl,lhd->thd", s.softmax(-1), v).reshape(q.shape[0], -1)


def test_fused_qkv_and_kv_packing(folders):
    """Published to_qkv rows [q | k | v] and cross_attn.to_kv rows [k | v], heads contiguous (16 × 64)."""
    m = loaded(folders, "v1.1", "dense_dit")
    block = m.blocks[1]
    sa, ca = fp32(block.self_attn), fp32(block.cross_attn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 1024, generator=g)
    ctx = torch.randn(1, 7, 1024, generator=g)
    w, b = sa.to_qkv.weight, sa.to_qkv.bias
    c, h, d = 1024, 16, 64
    q, k, v = ((x[0] @ w[i * c:(i + 1) * c].T + b[i * c:(i + 1) * c]).view(5, h, d) for i in range(3))

    def rms(t, gamma):
        return t / t.norm(dim=-1, keepdim=True) * gamma * math.sqrt(d)

    q, k = rms(q, sa.q_rms_norm.gamma), rms(k, sa.k_rms_norm.gamma)
    expect = _manual_attention(q, k, v) @ sa.to_out.weight.T + sa.to_out.bias
    with torch.no_grad():
        torch.testing.assert_close(sa(x)[0], expect, atol=1e-4, rtol=1e-4)
        wkv, bkv = ca.to_kv.weight, ca.to_kv.bias
        kc, vc = ((ctx[0] @ wkv[i * c:(i + 1) * c].T + bkv[i * c:(i + 1) * c]).view(7, h, d) for i in range(2))
        qc = (x[0] @ ca.to_q.weight.T + ca.to_q.bias).view(5, h, d)
        expect = _manual_attention(qc, kc, vc) @ ca.to_out.weight.T + ca.to_out.bias
        torch.testing.assert_close(ca(x, ConditionTokens(ctx))[0], expect, atol=1e-4, rtol=1e-4)


def test_sparse_vae_fused_qkv_packing(folders):
    """SS-VAE to_qkv rows [q | k | v], 8 heads × 64; tokens inside one 8³ window attend to each other only."""
    m = loaded(folders, "v1.1", "sparse_vae_512")
    attn = fp32(m.encoder.blocks[0].attn)
    g = torch.Generator().manual_seed(0)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [7, 7, 7], [4, 0, 6], [2, 5, 1]])
    x = SparseTensor.from_samples([coords], [torch.zeros(5, 1)], resolution=64)
    h = torch.randn(5, 512, generator=g)
    w, b, c = attn.to_qkv.weight, attn.to_qkv.bias, 512
    q, k, v = ((h @ w[i * c:(i + 1) * c].T + b[i * c:(i + 1) * c]).view(5, 8, 64) for i in range(3))
    expect = _manual_attention(q, k, v) @ attn.to_out.weight.T + attn.to_out.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x, h), expect, atol=1e-4, rtol=1e-4)


def test_dense_pos_emb_layout_and_mismatch_warning(folders, caplog):
    """The stored table is checked against d3s2's APE: row 256x + 16y + z, [sin | cos] per axis, x, y, z."""
    m = loaded(folders, "v1.1", "dense_dit")
    torch.testing.assert_close(m.pos_emb.float(), reference_ape(
        torch.stack(torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij"), -1).reshape(-1, 3)), atol=1e-3, rtol=0)
    with caplog.at_level(logging.WARNING):
        pub._check_pos_emb(m, {"pos_emb": m.pos_emb}, "ok")
    assert not caplog.records
    transposed = m.pos_emb.view(16, 16, 16, 1024).permute(2, 1, 0, 3).reshape(4096, 1024)  # row = x + 16y + 256z
    with caplog.at_level(logging.WARNING):
        pub._check_pos_emb(m, {"pos_emb": transposed}, "bad")
    assert "pos_emb differs" in caplog.text


@pytest.mark.parametrize("name,factor", [("sparse_dit_512", 1.0), ("sparse_dit_1024", 0.5)])
def test_sparse_ape_uses_the_same_layout_with_coordinate_factor(folders, name, factor):
    m = loaded(folders, "v1.1", name)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [127, 5, 64], [9, 99, 33]])
    torch.testing.assert_close(m.pos_embedder(coords), reference_ape(coords * factor), atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_cos_then_sin(folders):
    m = loaded(folders, "v1.1", "sparse_dit_512")
    t = torch.tensor([0.0, 1.0, 437.5, 999.0])
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs
    feat = torch.cat([torch.cos(args), torch.sin(args)], 1).float()
    embedder = fp32(m.t_embedder)
    expect = embedder.mlp[2](F.silu(embedder.mlp[0](feat)))
    with torch.no_grad():
        # float32 arguments t·f of up to ~1000 carry ~1e-4 absolute error; a swapped [sin, cos] is off by O(1).
        torch.testing.assert_close(embedder(t), expect, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ strictness
def test_strict_mapping_lists_every_violation():
    from .synthetic import published_config

    with torch.device("meta"):
        model = pub.build_component("sparse_dit_512", published_config("v1.1")["sparse_dit_512"])
    sd = random_state_dict(entries("v1.1", "sparse_dit_512"), 0)
    sd.pop("blocks.2.mlp.mlp.0.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["out_layer.weight"] = torch.zeros(16, 1000)
    sd["blocks.1.self_attn.compression_key.act_layers.0.conv.kernel"] = torch.zeros(1, 64, 64)
    with pytest.raises(ValueError) as err:
        pub.from_published(model, sd, where="ckpt")
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "missing blocks.2.mlp.mlp.0.bias (shape [4096])" in msg
    assert "unexpected blocks.0.extra.weight" in msg
    assert "out_layer.weight: expected shape [16, 1024], got [16, 1000]" in msg
    assert "compression_key.act_layers.0.conv.kernel: expected a 2-D torchsparse kernel" in msg


def test_refuses_anything_but_weights_only(tmp_path):
    path = tmp_path / "model_refiner.ckpt"
    torch.save({"refiner": {"w": torch.zeros(2)}, "meta": {"fn": pickle.dumps}}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        pub.load_checkpoint(path)
    torch.save({"refiner": {"w": [1, 2]}}, path)
    with pytest.raises(ValueError, match="tensors only"):
        pub.load_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="dict of state dicts"):
        pub.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        pub.load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"cannot read the checkpoint \(\d+ bytes\), truncated or corrupted: .*download it again"),
    ("empty", r"expected a torch.save checkpoint, got an empty file \(download it again\)"),
    ("lfs pointer", r"got a Git LFS pointer file \(fetch the file itself: git lfs pull"),
    ("html page", r"got a file that starts with b'<!DOCTYPE html>"),
])
def test_a_damaged_download_is_named_with_its_file(tmp_path, damage, message):
    path = tmp_path / "model_refiner.ckpt"
    torch.save({"refiner": {"w": torch.zeros(1000)}}, path)
    data = {"truncated": path.read_bytes()[:-200], "empty": b"",
            "lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 33586453\n",
            "html page": b"<!DOCTYPE html><html>Not Found</html>"}[damage]
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        pub.load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("config_version, file_version", [("v1.1", "v1.0"), ("v1.0", "v1.1")])
def test_a_sparse_dit_checkpoint_of_the_other_release_names_the_versions(folders, config_version, file_version):
    other = pub.load_checkpoint(folders[file_version] / "model_sparse_512.ckpt")
    with pytest.raises(ValueError) as err:
        pub.load_component(folders[config_version], "sparse_dit_512", checkpoint=other)
    msg = str(err.value)
    assert "problem(s) mapping to SparseDiT" in msg and "intra_block_pe: expected shape" in msg
    assert msg.endswith(f"config.yaml describes the sparse DiT of Direct3D-S2 {config_version}; a checkpoint from "
                        "the other release folder (direct3d-s2-v-1-0 or direct3d-s2-v-1-1) does not fit it: take "
                        "config.yaml and every model_*.ckpt from one folder")


def test_config_is_read_strictly(tmp_path):
    from .synthetic import published_config

    cfg = published_config("v1.1")
    torch.set_default_device("meta")  # nothing here needs real weights
    try:
        _check_config_errors(cfg)
    finally:
        torch.set_default_device("cpu")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        pub.read_config(tmp_path)


def test_convert_names_a_malformed_config_yaml(tmp_path, capsys):
    from d3s2.cli import main

    (tmp_path / "config.yaml").write_text("dense_vae: [\n")
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'config.yaml'}: invalid YAML at line 2, column 1: expected the node content" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _check_config_errors(cfg):
    with pytest.raises(ValueError, match=r"unknown parameters \['new_knob'\]"):
        pub.build_component("refiner", {**cfg["refiner"], "params": {**cfg["refiner"]["params"], "new_knob": 1}})
    with pytest.raises(ValueError, match="expected target class Voxel_RefinerXL_sign"):
        pub.build_component("refiner_1024", cfg["refiner"])
    with pytest.raises(ValueError, match="'patch_size': expected one of \\[1\\]"):
        pub.build_component("dense_dit", {**cfg["dense_dit"], "params": {**cfg["dense_dit"]["params"],
                                                                         "patch_size": 2}})


@pytest.mark.parametrize("version", VERSIONS)
def test_published_defaults(version):
    from .synthetic import published_config

    d = pub.read_defaults(published_config(version))
    assert d.version == version and d.sparse_conditions == (version == "v1.0")
    assert [(s.steps, s.guidance_scale, s.shift) for s in (d.dense, d.sparse_512, d.sparse_1024)] == [
        (50, 7.0, 6.0), (30, 7.0, 6.0), (15, 7.0, 8.0)]
    assert (d.mc_threshold, d.refiner_512_level, d.occupancy_threshold, d.sparse_1024_decode_chunk) == (
        0.2, 0.4, 0.1, 32)  # published chunk_size 4 chunks per axis of the 128³ latent grid
    assert (d.image_encoder, d.image_size) == ("dinov2_vitl14_reg", 518)
    assert d.to_dict()["sparse_1024"]["shift"] == 8.0
