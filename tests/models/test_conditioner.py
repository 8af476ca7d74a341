import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from d3s2.models.conditioner import (
    DinoV2Encoder,
    SmallImageEncoder,
    estimate_foreground,
    hub_to_transformers,
    load_image,
    prepare_batch,
    preprocess_image,
    sparse_condition_tokens,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: on a loaded 2-core machine two intra-op threads make them ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_config():
    return DinoV2Encoder.vitl14_reg4_config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=28, patch_size=14)


def _random_hub_state(seed=0, c=128, depth=2, patch=14, grid=2, registers=4):
    """A torch-hub DINOv2 state dict (dinov2 vision_transformer names) with random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale
    sd = {"cls_token": r(1, 1, c), "pos_embed": r(1, 1 + grid * grid, c), "register_tokens": r(1, registers, c),
          "mask_token": torch.zeros(1, c), "patch_embed.proj.weight": r(c, 3, patch, patch, scale=0.02),
          "patch_embed.proj.bias": r(c)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(c), p + "norm1.bias": r(c), p + "attn.qkv.weight": r(3 * c, c),
                   p + "attn.qkv.bias": r(3 * c), p + "attn.proj.weight": r(c, c), p + "attn.proj.bias": r(c),
                   p + "ls1.gamma": 1 + r(c), p + "norm2.weight": 1 + r(c), p + "norm2.bias": r(c),
                   p + "mlp.fc1.weight": r(4 * c, c), p + "mlp.fc1.bias": r(4 * c),
                   p + "mlp.fc2.weight": r(c, 4 * c), p + "mlp.fc2.bias": r(c), p + "ls2.gamma": 1 + r(c)})
    sd.update({"norm.weight": 1 + r(c), "norm.bias": r(c)})
    return sd


def _hub_reference_prenorm(sd, x, heads):
    """The torch-hub DINOv2 forward written from its definition (independent of transformers)."""
    c = sd["cls_token"].shape[-1]
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    b = h.shape[0]
    h = torch.cat([sd["cls_token"].expand(b, -1, -1), h], 1) + sd["pos_embed"]
    h = torch.cat([h[:, :1], sd["register_tokens"].expand(b, -1, -1), h[:, 1:]], 1)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        y = F.layer_norm(h, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.view(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * (c // heads) ** -0.5).softmax(-1) @ v
        h = h + sd[p + "ls1.gamma"] * F.linear(a.transpose(1, 2).reshape(b, -1, c), sd[p + "attn.proj.weight"],
                                               sd[p + "attn.proj.bias"])
        y = F.layer_norm(h, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + sd[p + "ls2.gamma"] * y
        i += 1
    return h


def test_hub_pth_matches_reference_dinov2_forward(tmp_path):
    sd = _random_hub_state()
    torch.save(sd, tmp_path / "dinov2_tiny_reg4.pth")
    enc = DinoV2Encoder.from_pretrained(tmp_path / "dinov2_tiny_reg4.pth", num_heads=2)
    assert (enc.image_size, enc.patch_size, enc.num_prefix_tokens, enc.out_channels) == (28, 14, 5, 128)
    x = torch.rand(2, 3, 28, 28)
    out = enc(x)
    assert out.shape == (2, 5 + 4, 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = _hub_reference_prenorm(sd, (x - mean) / std, heads=2)
    torch.testing.assert_close(out, F.layer_norm(ref, (128,)), rtol=1e-4, atol=1e-4)
    # A training checkpoint wrapped as {"teacher": {"backbone.*"}} with chunked blocks loads the same.
    wrapped = {"teacher": {"backbone." + k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else
                           "backbone." + k: v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    torch.testing.assert_close(DinoV2Encoder.from_pretrained(tmp_path / "wrapped.pth", num_heads=2)(x), out)


def test_hf_directory_roundtrip_equals_hub_format(tmp_path):
    enc = DinoV2Encoder.random(_tiny_config(), seed=3)
    enc.model.save_pretrained(tmp_path / "hf")
    loaded = DinoV2Encoder.from_pretrained(tmp_path / "hf")
    x = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(loaded(x), enc(x))
    # The same weights through the torch-hub layout: map HF → hub names here, load back through our mapping.
    hf = enc.model.state_dict()
    hub = {"cls_token": hf["embeddings.cls_token"], "mask_token": hf["embeddings.mask_token"],
           "pos_embed": hf["embeddings.position_embeddings"], "register_tokens": hf["embeddings.register_tokens"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    names = {k for k in hf}
    q = "attention.q_proj" if "encoder.layer.0.attention.q_proj.weight" in names else "attention.attention.query"
    kname, vname = q.replace("q_proj", "k_proj").replace("query", "key"), q.replace("q_proj", "v_proj").replace(
        "query", "value")
    o = "attention.o_proj" if "encoder.layer.0.attention.o_proj.weight" in names else "attention.output.dense"
    for i in range(2):
        p, hp = f"blocks.{i}.", f"encoder.layer.{i}."
        for s in ("weight", "bias"):
            hub[p + f"attn.qkv.{s}"] = torch.cat([hf[f"{hp}{n}.{s}"] for n in (q, kname, vname)])
            hub[p + f"attn.proj.{s}"] = hf[f"{hp}{o}.{s}"]
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                hub[p + f"{a}.{s}"] = hf[f"{hp}{b}.{s}"]
        hub[p + "ls1.gamma"] = hf[hp + "layer_scale1.lambda1"]
        hub[p + "ls2.gamma"] = hf[hp + "layer_scale2.lambda1"]
    torch.save(hub, tmp_path / "hub.pth")
    torch.testing.assert_close(DinoV2Encoder.from_pretrained(tmp_path / "hub.pth", num_heads=2)(x), enc(x))


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_reg4_pretrain.pth"):
        DinoV2Encoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DinoV2Encoder.from_pretrained(tmp_path / "empty_dir")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read DINOv2 checkpoint"):
        DinoV2Encoder.from_pretrained(tmp_path / "junk.pth")
    (tmp_path / "notes.pth").write_text("hello\n")  # the unpickler reads 'h' as a memo lookup: a KeyError
    with pytest.raises(ValueError, match="cannot read DINOv2 checkpoint .*expected a torch.save file"):
        DinoV2Encoder.from_pretrained(tmp_path / "notes.pth")
    (tmp_path / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        DinoV2Encoder.from_pretrained(tmp_path / "lfs.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="torch-hub DINOv2"):
        DinoV2Encoder.from_pretrained(tmp_path / "other.pth")
    with pytest.raises(KeyError, match="unexpected"):
        hub_to_transformers({"cls_token": torch.zeros(1, 1, 4), "weird.key": torch.zeros(1)},
                            {"embeddings.cls_token"})


def _rgba_object(size=(120, 90), box=(30, 20, 70, 60)):
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[..., :3] = 40
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (200, 30, 30, 255)
    return arr


def test_preprocess_alpha_crops_pads_and_resizes():
    prep = preprocess_image(_rgba_object(), size=98, border=7)
    assert prep.rgb.shape == (3, 98, 98) and prep.mask.shape == (98, 98)
    # The 40x40 object fills the square crop; after the 7-px border at 98 → resize to 98, it spans 7..91.
    rows = torch.nonzero(prep.mask > 0.5)
    assert rows.min() >= 6 and rows.max() <= 91 and rows.min() <= 8 and rows.max() >= 89
    assert torch.allclose(prep.rgb[:, 0, 0], torch.ones(3))  # white outside the object
    centre = prep.rgb[:, 49, 49]
    torch.testing.assert_close(centre, torch.tensor([200, 30, 30]) / 255.0, atol=0.02, rtol=0)
    rgb, mask = prepare_batch([prep, prep])
    assert rgb.shape == (2, 3, 98, 98) and mask.shape == (2, 98, 98)


def test_background_estimate_on_synthetic_image_warns():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(180, 6, (100, 100, 3)), 0, 255).astype(np.uint8)  # noisy plain background
    truth = np.zeros((100, 100), bool)
    truth[25:75, 35:70] = True
    img[truth] = (20, 90, 160)
    img[45:55, 45:55] = (180, 180, 180)  # a background-coloured hole inside the object is filled
    mask = estimate_foreground(img)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.98
    with pytest.warns(UserWarning, match="no alpha channel"):
        prep = preprocess_image(img, size=56, border=4)
    assert prep.mask.max() == 1.0


def _shaded_sphere(size: int, background: int) -> np.ndarray:
    """uint8 ``[size, size]`` gray: a sphere lit from the top left, tones 20 (lit) to 110, on ``background``."""
    y, x = (np.mgrid[:size, :size] + 0.5 - size / 2) / (0.35 * size)
    inside = x**2 + y**2 < 1
    light = np.clip(-0.5 * x - 0.5 * y + 0.7 * np.sqrt(np.clip(1 - x**2 - y**2, 0, 1)), 0, 1)
    return np.where(inside, 110 - 90 * light, background).astype(np.uint8)


@pytest.mark.parametrize("background", [255, 180])
def test_a_dithered_1_bit_image_separates_like_its_continuous_tone_original(tmp_path, background):
    gray = _shaded_sphere(128, background)
    path = tmp_path / "dithered.png"
    Image.fromarray(gray).convert("1").save(path)  # Floyd-Steinberg: tones become densities of black dots
    original = estimate_foreground(np.repeat(gray[..., None], 3, axis=2))
    dithered = estimate_foreground(np.asarray(load_image(path)))
    assert (dithered & original).sum() / (dithered | original).sum() > 0.9
    with pytest.warns(UserWarning, match="no alpha channel"):
        assert preprocess_image(path, size=64).mask.max() == 1.0


def test_clear_errors_on_empty_and_corrupt_images(tmp_path):
    empty = _rgba_object()
    empty[..., 3] = 0
    with pytest.raises(ValueError, match="alpha channel is empty"):
        preprocess_image(empty)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could not separate"):
            preprocess_image(np.full((32, 32, 3), 128, np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        preprocess_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="image not found"):
        preprocess_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")  # an interrupted copy, say
    with pytest.raises(ValueError, match=r"empty.png: the file is empty \(0 bytes\), expected a PNG, JPEG"):
        preprocess_image(tmp_path / "empty.png")
    Image.fromarray(_rgba_object()).save(tmp_path / "ok.png")
    assert preprocess_image(tmp_path / "ok.png", size=28, border=1).rgb.shape == (3, 28, 28)


def test_sparse_condition_tokens_keep_prefix_and_foreground_patches():
    b, g, p, c = 2, 3, 4, 5
    feats = torch.randn(b, 2 + g * g, c)
    mask = torch.zeros(b, g * p, g * p)
    mask[0, 0, 5] = 0.2  # touches patch (row 0, col 1)
    mask[0, 11, 11] = 1.0  # patch (row 2, col 2)
    mask[1] = 1.0  # every patch
    cond = sparse_condition_tokens(feats, mask, patch_size=p, num_prefix_tokens=2)
    assert cond.tokens.shape == (2, 2 + 9, c) and cond.mask.sum(1).tolist() == [4, 11]
    torch.testing.assert_close(cond.tokens[0, :4], feats[0, [0, 1, 2 + 1, 2 + 8]])
    assert cond.coords[0, :4].tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 0], [2, 2, 0]]
    assert torch.count_nonzero(cond.tokens[0, 4:]) == 0
    torch.testing.assert_close(cond.tokens[1], feats[1])
    with pytest.raises(ValueError, match="tokens for mask"):
        sparse_condition_tokens(feats, mask, patch_size=6, num_prefix_tokens=2)


def test_small_encoder_interface_and_training_step():
    enc = SmallImageEncoder(SmallImageEncoder.Config(image_size=28, patch_size=7, width=32, depth=2, num_heads=2,
                                                     num_register_tokens=2))
    x, mask = torch.rand(2, 3, 28, 28), torch.zeros(2, 28, 28)
    mask[:, 8:20, 8:20] = 1
    out = enc(x)
    assert out.shape == (2, 3 + 16, 32) and torch.isfinite(out).all()
    dense = enc.condition(x)
    sparse = enc.condition(x, mask, sparse=True)
    assert dense.mask is None and sparse.mask.sum(1).tolist() == [3 + 4, 3 + 4]  # pixels 8..19 touch patches 1..2
    sparse.tokens.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 28, 28\]"):
        enc(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SmallImageEncoder(SmallImageEncoder.Config(image_size=30, patch_size=7))
