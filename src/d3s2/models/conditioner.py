"""Image conditioning: preprocessing, the DINOv2 encoder, a small encoder trained from scratch, and the
dense / sparse condition tokens the DiTs cross-attend to.

Dimension legend: B batch, S encoder input side (518 for DINOv2 ViT-L/14), p patch size, g = S / p patch grid,
P = g² patch tokens, R register tokens, T = 1 + R + P tokens, C channels.

Nothing here downloads anything: DINOv2 weights load from a local Hugging Face directory or a torch-hub
``.pth`` state dict (``dinov2_vitl14_reg4_pretrain.pth``); ``transformers`` is imported only when a DINOv2
encoder is built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from torch import nn

from .dit.condition import ConditionTokens

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_IMAGE_SIZE = 518


# ---------------------------------------------------------------------------------------------- images
MIN_IMAGE_SIDE = 16  # pixels; smaller inputs hold too little of the object for any encoder


def load_image(image: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Open ``image`` (a path, a PIL image or an ``[H, W, 3|4]`` uint8 array) as RGB or RGBA, upright
    (:func:`upright_rgb_or_rgba`).

    Raises FileNotFoundError for a missing file, IsADirectoryError for a folder and ValueError for an unreadable
    image, one smaller than :data:`MIN_IMAGE_SIDE` pixels a side, or a file above ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels (checked on the header, before decoding).
    """
    name, exif_problems = "image", []
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array [H, W, 3|4], got {image.dtype} {image.shape}")
        img = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        img = image
    else:
        path = Path(image)
        name = f"image {path}"
        img, exif_problems = _read_image_file(path)
    img = upright_rgb_or_rgba(img, exif_problems=exif_problems)  # its EXIF warning comes before a size error
    if img.width < MIN_IMAGE_SIDE or img.height < MIN_IMAGE_SIDE:
        raise ValueError(f"{name}: expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, "
                         f"got {img.width}x{img.height}")
    return img


# EXIF orientation -> the transpose that shows the stored pixels upright (the table of PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ORIENTATION_INFO = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where PIL reads the tag from


# catch_warnings swaps process-wide state (Python < 3.14): two threads inside it at once (the app's uploads are
# decoded in a thread pool) restore each other's filters and leave a recorder installed for good
_COLLECTING = threading.RLock()


@contextlib.contextmanager
def exif_warnings_collected() -> Iterator[list[str]]:
    """The messages of the warnings PIL's TIFF tag reader raises in the block about damaged EXIF metadata
    ("Corrupt EXIF data. ...", "Truncated File Read"), collected instead of shown (the list fills when the block
    ends; for :func:`upright_rgb_or_rgba`'s ``exif_problems``); any other warning is shown as usual. One thread
    at a time runs such a block."""
    messages: list[str] = []
    try:
        with _COLLECTING, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            yield messages
    finally:
        for w in caught:
            if Path(w.filename).name == "TiffImagePlugin.py":
                messages.append(" ".join(str(w.message).split()))  # PIL pads them with double and trailing spaces
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def exif_upright(img: Image.Image) -> Image.Image:
    """A copy of ``img`` turned by its EXIF orientation tag (camera photos store the sensor's pixels plus that tag),
    without the metadata that held the tag: turning the copy again changes nothing.

    Damaged EXIF metadata never loses the image: what PIL reports about it (its "Corrupt EXIF data" warnings, or
    the error that stopped it reading the block) becomes one UserWarning that says whether the orientation could
    still be read; when it could not, the pixels are used as stored. (PIL's ``ImageOps.exif_transpose`` also
    rewrites the metadata, which fails on some damaged blocks it could read.)
    """
    return _exif_upright(img, [])


def _exif_upright(img: Image.Image, problems: list[str]) -> Image.Image:
    """:func:`exif_upright`, with ``problems`` that PIL already reported about ``img``'s metadata (a JPEG reads its
    EXIF block as it opens)."""
    img.load()  # decoded first: only the metadata is read while its warnings are collected
    with exif_warnings_collected() as reading:
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation)
        except (SyntaxError, struct.error, OSError, ValueError) as err:  # a bad TIFF header or IFD in the block
            orientation, problems = None, [*problems, str(err)]
    problems = [*problems, *reading]
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if problems:
        outcome = ("its orientation tag was read and applied" if method is not None
                   else "no orientation could be read from it, so the pixels are used as stored (turn the image "
                        "upright yourself if it shows sideways)")
        warnings.warn(f"damaged EXIF metadata ({'; '.join(dict.fromkeys(problems))}): {outcome}", stacklevel=2)
    upright = img.transpose(method) if method is not None else img.copy()
    for key in _ORIENTATION_INFO:
        upright.info.pop(key, None)
    return upright


def upright_rgb_or_rgba(img: Image.Image, *, exif_problems: Sequence[str] = ()) -> Image.Image:
    """``img`` as a viewer shows it: its EXIF orientation applied (:func:`exif_upright`), as 8-bit RGBA when it has
    transparency (an alpha channel that is not opaque everywhere, a palette or PNG tRNS key colour), else as
    8-bit RGB. ``exif_problems``: what PIL reported about the metadata as ``img`` opened (collected by
    :func:`exif_warnings_collected` around ``Image.open``; a JPEG reads its EXIF block then), in the same one
    warning."""
    img = _exif_upright(img, list(exif_problems))
    if img.mode == "I" or img.mode.startswith("I;16") or img.mode == "F":
        # PIL's convert clips these to 0..255 (16-bit gray turns white, float gray in [0, 1] black): scale to 8 bits.
        values = np.nan_to_num(np.asarray(img, np.float64))
        scale = 1.0 / 257.0 if img.mode != "F" else (255.0 if values.max(initial=0.0) <= 1.0 else 1.0)
        img = Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8))
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    if has_alpha and img.getchannel("A").getextrema()[0] == 255:
        # Opaque everywhere (a flattened render or a screenshot): the alpha outlines no object, only the frame.
        # As RGB, the object is found against the background instead.
        img = img.convert("RGB")
    return img


def _read_image_file(path: Path) -> tuple[Image.Image, list[str]]:
    """The decoded image at ``path`` as stored, and what PIL reported about its EXIF metadata as it opened (for
    :func:`upright_rgb_or_rgba`); its size is checked against ``PIL.Image.MAX_IMAGE_PIXELS`` first."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read image {path}: the file is empty (0 bytes), expected a PNG, JPEG or other "
                         "image file")
    limit = Image.MAX_IMAGE_PIXELS  # read at call time: a caller may change it (None: no limit, as in PIL)
    too_large = f"image {path} is too large: expected at most {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
    unreadable = (OSError, SyntaxError, ValueError)  # what PIL raises for truncated or corrupt data
    try:
        with exif_warnings_collected() as opening:  # a JPEG reads its EXIF block as it opens (for the dpi)
            f = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses twice its limit on the header (and warns between once and twice: an error under -W error).
        raise ValueError(f"{too_large}, got more than that") from err
    except unreadable as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    with f:
        if limit is not None and f.width * f.height > limit:
            raise ValueError(f"{too_large}, got {f.width}x{f.height}")
        try:
            f.load()
        except unreadable as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        return f.copy(), opening


def check_object_alpha(img: Image.Image) -> None:
    """Raise ValueError when ``img`` (from :func:`load_image`) has an alpha channel but no pixel of it is set."""
    if img.mode == "RGBA" and img.getchannel("A").getbbox() is None:  # getbbox: None when every value is 0
        raise ValueError("the image's alpha channel is empty: no object to condition on")


HALFTONE_SIGMA = 1.5  # pixels: Floyd-Steinberg error diffusion renders a tone within about 3x3 to 5x5 pixels


def _is_halftone(rgb: np.ndarray) -> bool:
    """True when every channel of the uint8 ``[H, W, C]`` image holds at most two levels (a 1-bit image, per-channel
    dithering): its tones are densities of dots."""
    return all(np.count_nonzero(np.bincount(rgb[..., c].ravel(), minlength=256)) <= 2 for c in range(rgb.shape[2]))


def estimate_foreground(rgb: np.ndarray, *, threshold: float = 30.0, border: int = 2) -> np.ndarray:
    """Weight-free foreground mask for an object on a plain background.

    The background colour is the median of a ``border``-pixel frame; pixels whose largest channel difference
    from it exceeds ``threshold`` are foreground, then a binary opening removes specks and holes are filled.
    A halftone (every channel holds two levels: a 1-bit image, a dithered one) draws its tones as densities of
    dots, which the opening would remove as specks: its tones are first recovered as local dot densities (a
    Gaussian blur of :data:`HALFTONE_SIGMA` pixels, as the eye averages the dots).

    Args:
        rgb: uint8 ``[H, W, 3]``.
    Returns:
        bool ``[H, W]``.
    """
    from scipy import ndimage

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {rgb.shape}")
    tones = rgb.astype(np.float32)
    if _is_halftone(rgb):
        tones = ndimage.gaussian_filter(tones, sigma=(HALFTONE_SIGMA, HALFTONE_SIGMA, 0))
    h, w = rgb.shape[:2]
    b = max(1, min(border, h // 2, w // 2))
    frame = np.concatenate([tones[:b].reshape(-1, 3), tones[-b:].reshape(-1, 3),
                            tones[:, :b].reshape(-1, 3), tones[:, -b:].reshape(-1, 3)])
    background = np.median(frame, axis=0)
    diff = np.abs(tones - background).max(axis=2)
    mask = ndimage.binary_opening(diff > threshold, structure=np.ones((3, 3), bool), iterations=2)
    return ndimage.binary_fill_holes(mask)


@dataclass(frozen=True)
class PreparedImage:
    """An object image ready for an encoder.

    Attributes:
        rgb: float32 ``[3, S, S]`` in [0, 1], the object composited on white.
        mask: float32 ``[S, S]`` in [0, 1], the object's alpha after the same crop/pad/resize.
    """

    rgb: torch.Tensor
    mask: torch.Tensor


def preprocess_image(
    image: str | os.PathLike | Image.Image | np.ndarray,
    *,
    size: int = DINO_IMAGE_SIZE,
    border: int = 16,
    threshold: float = 30.0,
) -> PreparedImage:
    """The published preprocessing: alpha → crop to the object → composite on white → pad square → resize to
    ``size`` → pad ``border`` white pixels per side → resize back to ``size``.

    Without an alpha channel the mask comes from :func:`estimate_foreground` (plain backgrounds only), with a
    warning. Raises ValueError when no object can be found.
    """
    img = load_image(image)
    check_object_alpha(img)
    arr = np.asarray(img)
    if img.mode == "RGBA":
        alpha = arr[..., 3].astype(np.float32) / 255.0
        rgb = arr[..., :3]
    else:
        rgb = arr
        warnings.warn("image has no alpha channel (or an opaque one): estimating the background from the border "
                      "colour; pass an RGBA image with the object's alpha for reliable results", stacklevel=2)
        mask = estimate_foreground(rgb, threshold=threshold)
        if not mask.any():
            raise ValueError("could not separate the object from the background (nothing larger than a few "
                             "pixels differs from the border colour); pass an RGBA image with the object's alpha")
        alpha = mask.astype(np.float32)
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    alpha = alpha[y0:y1, x0:x1]
    rgb = rgb[y0:y1, x0:x1].astype(np.float32) / 255.0
    rgb = rgb * alpha[..., None] + (1.0 - alpha[..., None])  # composite on white
    rgbt = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # [3, h, w]
    at = torch.from_numpy(np.ascontiguousarray(alpha))[None]  # [1, h, w]
    rgbt, at = _pad_square(rgbt, at)
    rgbt, at = _resize(rgbt, at, size)
    rgbt = F.pad(rgbt, (border,) * 4, value=1.0)
    at = F.pad(at, (border,) * 4, value=0.0)
    rgbt, at = _resize(rgbt, at, size)
    return PreparedImage(rgbt.clamp(0, 1).contiguous(), at[0].clamp(0, 1).contiguous())


def _pad_square(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = rgb.shape[1:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    pad = (left, s - w - left, top, s - h - top)
    return F.pad(rgb, pad, value=1.0), F.pad(alpha, pad, value=0.0)


def _resize(rgb: torch.Tensor, alpha: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.cat([rgb, alpha])[None]  # [1, 4, h, w]
    out = F.interpolate(both, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out[:3], out[3:]


def prepare_batch(images: list[PreparedImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prepared images: ``rgb [B, 3, S, S]`` and ``mask [B, S, S]``."""
    if not images:
        raise ValueError("expected at least one image")
    return torch.stack([i.rgb for i in images]), torch.stack([i.mask for i in images])


# ---------------------------------------------------------------------------------------------- tokens
def dense_condition_tokens(features: torch.Tensor) -> ConditionTokens:
    """All encoder tokens ``[B, T, C]`` as the condition (published v1.1)."""
    return ConditionTokens(features)


def sparse_condition_tokens(features: torch.Tensor, mask: torch.Tensor, *, patch_size: int,
                            num_prefix_tokens: int) -> ConditionTokens:
    """Keep the cls/register tokens and the patches that touch the object (paper §4.2, published v1.0).

    Args:
        features: ``[B, T, C]`` encoder tokens, ``num_prefix_tokens`` first, then the g×g patches row-major.
        mask: ``[B, S, S]`` object alpha at the encoder input resolution; a patch is kept when its max-pooled
            alpha is > 0.
    Returns:
        ConditionTokens padded to the largest kept count, with ``mask`` and ``coords``: patch ``(col, row, 0)``,
        prefix tokens ``(0, 0, 1)``.
    """
    b, t, c = features.shape
    if mask.ndim != 3 or mask.shape[0] != b:
        raise ValueError(f"expected mask of shape [{b}, S, S], got {tuple(mask.shape)}")
    keep = F.max_pool2d(mask[:, None].float(), patch_size)[:, 0] > 0  # [B, g, g]
    g = keep.shape[-1]
    if num_prefix_tokens + g * g != t or keep.shape[-2] != g:
        raise ValueError(f"expected {num_prefix_tokens} + {keep.shape[-2]}x{g} tokens for mask {tuple(mask.shape)}"
                         f" and patch {patch_size}, got {t}")
    row, col = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    patch_coords = torch.stack([col, row, torch.zeros_like(row)], -1).reshape(g * g, 3).to(features.device)
    prefix_coords = torch.tensor([[0, 0, 1]], device=features.device).expand(num_prefix_tokens, 3)
    coords_all = torch.cat([prefix_coords, patch_coords])  # [T, 3]
    selected = torch.cat([torch.ones(b, num_prefix_tokens, dtype=torch.bool, device=features.device),
                          keep.reshape(b, -1).to(features.device)], 1)  # [B, T]
    counts = selected.sum(1)
    length = int(counts.max())
    # Stable sort puts the kept tokens first, in their original order.
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :length]  # [B, Lmax]
    tokens = torch.gather(features, 1, order[..., None].expand(b, length, c))
    valid = torch.arange(length, device=features.device)[None] < counts[:, None]
    tokens = tokens * valid[..., None].to(tokens.dtype)
    coords = coords_all[order] * valid[..., None]
    return ConditionTokens(tokens, valid, coords)


# ---------------------------------------------------------------------------------------------- encoders
class ImageEncoder(nn.Module):
    """Common interface: ``forward(rgb [B, 3, S, S] in [0, 1]) -> [B, T, C]`` tokens (prefix, then patches).

    Subclasses set ``image_size`` (S), ``patch_size`` (p), ``num_prefix_tokens`` (1 + R) and ``out_channels``.
    """

    image_size: int
    patch_size: int
    num_prefix_tokens: int
    out_channels: int

    def condition(self, rgb: torch.Tensor, mask: torch.Tensor | None = None, *, sparse: bool = False
                  ) -> ConditionTokens:
        """Encode and package as ConditionTokens; ``sparse`` keeps only foreground patches (needs ``mask``)."""
        features = self(rgb)
        if not sparse:
            return dense_condition_tokens(features)
        if mask is None:
            raise ValueError("sparse conditioning needs the object mask")
        return sparse_condition_tokens(features, mask, patch_size=self.patch_size,
                                       num_prefix_tokens=self.num_prefix_tokens)

    def _check_input(self, rgb: torch.Tensor) -> None:
        s = self.image_size
        if rgb.ndim != 4 or rgb.shape[1] != 3 or tuple(rgb.shape[2:]) != (s, s):
            raise ValueError(f"expected images of shape [B, 3, {s}, {s}], got {tuple(rgb.shape)}")


def _imagenet_normalize(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb - mean) / std


class DinoV2Encoder(ImageEncoder):
    """Frozen DINOv2 (published: ViT-L/14 with 4 registers at 518², 1374 × 1024 tokens) via ``transformers``.

    Features are the last block's output before the final norm (``x_prenorm``), then a LayerNorm without
    affine, as published. Build with :meth:`from_pretrained` (local weights) or :meth:`random` (tests,
    timing).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0))
        self.out_channels = int(cfg.hidden_size)

    @staticmethod
    def vitl14_reg4_config(**overrides: Any) -> Any:
        """The ``transformers`` config of DINOv2 ViT-L/14 with 4 registers at 518² (``dinov2_vitl14_reg``)."""
        from transformers import Dinov2WithRegistersConfig

        kw = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                  image_size=DINO_IMAGE_SIZE, num_register_tokens=4, layerscale_value=1.0, layer_norm_eps=1e-6)
        return Dinov2WithRegistersConfig(**{**kw, **overrides})

    @classmethod
    def random(cls, config: Any = None, *, seed: int = 0) -> DinoV2Encoder:
        """Randomly initialised (no weights needed): ViT-L/14-reg4 by default, or any transformers config."""
        config = config or cls.vitl14_reg4_config()
        torch.manual_seed(seed)
        return cls(_dino_model_class(config)(config))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, num_heads: int | None = None) -> DinoV2Encoder:
        """Load local weights: a Hugging Face directory (``config.json`` + weights) or a torch-hub ``.pth``.

        ``num_heads`` applies to ``.pth`` files only (the state dict does not record it; DINOv2 uses head
        dim 64, which is the default). Nothing is downloaded.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"DINOv2 weights not found at {p}. Expected a Hugging Face directory (e.g. a local copy of "
                "facebook/dinov2-with-registers-large with config.json and model.safetensors) or the torch-hub "
                "state dict dinov2_vitl14_reg4_pretrain.pth; nothing is downloaded at run time.")
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{p} is not a Hugging Face model directory: config.json is missing")
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(p, local_files_only=True)
            model = _dino_model_class(config).from_pretrained(p, local_files_only=True)
            return cls(model)
        return cls(_load_hub_checkpoint(p, num_heads=num_heads))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """``rgb [B, 3, S, S]`` in [0, 1] → ``[B, T, C]`` float32."""
        self._check_input(rgb)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=_imagenet_normalize(rgb.float()).to(dtype), output_hidden_states=True)
        prenorm = out.hidden_states[-1]  # last block output before the final LayerNorm
        return F.layer_norm(prenorm.float(), prenorm.shape[-1:])


def _dino_model_class(config: Any) -> type:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    kinds = {"dinov2_with_registers": Dinov2WithRegistersModel, "dinov2": Dinov2Model}
    if config.model_type not in kinds:
        raise ValueError(f"expected a DINOv2 config (model_type {sorted(kinds)}), got {config.model_type!r}")
    return kinds[config.model_type]


_HUB_PREFIXES = ("module.", "backbone.", "teacher.backbone.")


def _unwrap_hub_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "teacher"):
            if key in obj and isinstance(obj[key], dict) and "cls_token" not in obj:
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in _HUB_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise ValueError(f"{path} does not look like a torch-hub DINOv2 state dict (no cls_token / patch_embed)")
    return out


def _hub_block_index(key: str) -> tuple[int, str] | None:
    """``blocks.i.rest`` or the chunked ``blocks.c.i.rest`` → (i, rest)."""
    m = re.match(r"blocks\.(?:\d+\.)?(\d+)\.(.+)$", key)
    return (int(m.group(1)), m.group(2)) if m else None


def hub_to_transformers(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename a torch-hub DINOv2 state dict to the ``transformers`` layout whose keys are ``target_keys``.

    The fused ``attn.qkv`` is split into q, k, v (rows ``[q | k | v]``). Both the current (``q_proj`` /
    ``o_proj``) and older (``attention.attention.query`` / ``attention.output.dense``) transformers names are
    supported; the one present in ``target_keys`` is used.
    """
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": ["norm1"], "norm2": ["norm2"], "mlp.fc1": ["mlp.fc1"], "mlp.fc2": ["mlp.fc2"],
             "ls1.gamma": ["layer_scale1.lambda1"], "ls2.gamma": ["layer_scale2.lambda1"],
             "attn.proj": ["attention.o_proj", "attention.output.dense"]}
    qkv_names = [("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                 ("attention.attention.query", "attention.attention.key", "attention.attention.value")]

    def pick(prefix: str, candidates: list[str], suffix: str) -> str:
        for cand in candidates:
            name = f"{prefix}{cand}{suffix}"
            if name in target_keys:
                return name
        raise KeyError(f"no transformers parameter for {candidates} (suffix {suffix!r}) under {prefix!r}")

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            if key == "mask_token" and value.ndim == 3:  # some exports keep [1, 1, C]
                value = value[0]
            out[top[key]] = value
            continue
        parsed = _hub_block_index(key)
        if parsed is None:
            raise KeyError(f"unexpected torch-hub DINOv2 key {key!r}")
        i, rest = parsed
        prefix = f"encoder.layer.{i}."
        if rest.startswith("mlp.w12") or rest.startswith("mlp.w3"):
            raise ValueError("SwiGLU DINOv2 checkpoints (ViT-g) are not supported; use ViT-S/B/L")
        if rest.startswith("attn.qkv."):
            suffix = rest[len("attn.qkv"):]
            names = next((n for n in qkv_names if f"{prefix}{n[0]}{suffix}" in target_keys), None)
            if names is None:
                raise KeyError(f"no transformers q/k/v parameters for {key!r}")
            for name, part in zip(names, value.chunk(3, dim=0)):
                out[f"{prefix}{name}{suffix}"] = part.clone()
            continue
        for hub_name, candidates in block.items():
            if rest == hub_name or rest.startswith(hub_name + "."):
                out[pick(prefix, candidates, rest[len(hub_name):])] = value
                break
        else:
            raise KeyError(f"unexpected torch-hub DINOv2 key {key!r}")
    return out


def _load_hub_checkpoint(path: Path, *, num_heads: int | None) -> nn.Module:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    from ..pipeline.published import not_a_checkpoint

    # A text file (a Git LFS pointer, a saved error page) can send the unpickler into a KeyError traceback.
    not_torch_save = not_a_checkpoint(path)
    if not_torch_save:
        raise ValueError(f"cannot read DINOv2 checkpoint {path}: expected a torch.save file, got {not_torch_save}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read DINOv2 checkpoint {path}: {err}") from err
    state = _unwrap_hub_state_dict(raw, path)
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max(idx[0] for k in state if (idx := _hub_block_index(k)) is not None)
    fc1 = next((v for k, v in state.items() if k.endswith("mlp.fc1.weight")), None)
    if fc1 is None:
        raise ValueError(f"{path}: no mlp.fc1 weights (SwiGLU DINOv2 checkpoints such as ViT-g are not supported)")
    if fc1.shape[0] % hidden:
        raise ValueError(f"{path}: MLP width {fc1.shape[0]} is not a multiple of the width {hidden}")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    heads = num_heads or max(1, hidden // 64)
    kw = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
              mlp_ratio=fc1.shape[0] // hidden, patch_size=patch, image_size=grid * patch, layerscale_value=1.0,
              layer_norm_eps=1e-6, qkv_bias=any(k.endswith("attn.qkv.bias") for k in state))
    config = Dinov2WithRegistersConfig(num_register_tokens=registers, **kw) if registers else Dinov2Config(**kw)
    model = _dino_model_class(config)(config)
    mapped = hub_to_transformers(state, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 checkpoint {path} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    logger.info("loaded torch-hub DINOv2 (%d layers, width %d, %d registers) from %s", depth, hidden, registers,
                path)
    return model


class SmallImageEncoder(ImageEncoder):
    """A compact ViT trained from scratch, with the DINOv2 output interface (prefix tokens, then patches).

    For models trained here without pretrained weights: patch embedding (conv p×p stride p), cls + register
    tokens, learned position embeddings, ``depth`` pre-norm transformer layers, LayerNorm without affine.
    """

    @dataclass(kw_only=True)
    class Config:
        image_size: int = 224  # S; must be a multiple of patch_size
        patch_size: int = 14
        width: int = 256  # C
        depth: int = 4
        num_heads: int = 4
        mlp_ratio: float = 4.0
        num_register_tokens: int = 4

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        cfg = config or self.Config()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.config = cfg
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.num_prefix_tokens = 1 + cfg.num_register_tokens
        self.out_channels = cfg.width
        g = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.prefix_tokens = nn.Parameter(torch.randn(1, self.num_prefix_tokens, cfg.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + g * g, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.num_heads, int(cfg.width * cfg.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """``rgb [B, 3, S, S]`` in [0, 1] → ``[B, 1 + R + g², C]`` float32."""
        self._check_input(rgb)
        x = self.patch_embed(_imagenet_normalize(rgb.to(self.patch_embed.weight.dtype)))  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, P, C], patches row-major
        x = torch.cat([self.prefix_tokens.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.blocks(x)
        return F.layer_norm(x.float(), x.shape[-1:])
