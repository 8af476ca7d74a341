"""A tiny random image-to-3D pipeline (CPU, ~0.5 s per mesh at 64³): 8³ structure, 64³ and 128³ sparse stages."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch

from d3s2.models.conditioner import SmallImageEncoder
from d3s2.models.dit import DenseDiT, SparseDiT
from d3s2.models.registry import build_model
from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, PipelineSettings, StageSettings

# Random weights put sigmoid(logit) of the dense VAE near 0.5 everywhere; 0.7 keeps ~5 % of the 8³ structure
# (a trained model's logits are confident, so the published 0.1 works there).
TINY_OCCUPANCY_THRESHOLD = 0.7


def _sparse_dit(resolution: int, sparse_conditions: bool) -> SparseDiT:
    return SparseDiT(SparseDiT.Config(resolution=resolution, in_channels=4, out_channels=4, model_channels=32,
                                      cond_channels=16, num_blocks=2, num_heads=4, num_kv_heads=2, mlp_ratio=2.0,
                                      compression_block_size=2, selection_block_size=4, topk=2, window_size=4,
                                      sparse_conditions=sparse_conditions))


def _sparse_vae():
    return build_model("sparse_sdf_vae", dict(latent_channels=4, model_channels=16, num_blocks=1, num_heads=2,
                                              window_size=4, mlp_ratio=2.0, down_channels=[8, 8, 8],
                                              up_channels=[8, 8, 8], num_groups=4))


def tiny_pipeline(seed: int = 0) -> ImageTo3DPipeline:
    """Random weights; zero-initialised output layers are perturbed so that every stage does something."""
    torch.manual_seed(seed)
    enc = SmallImageEncoder(SmallImageEncoder.Config(image_size=28, patch_size=14, width=16, depth=1, num_heads=2,
                                                     mlp_ratio=2.0, num_register_tokens=1))
    dense_dit = DenseDiT(DenseDiT.Config(resolution=2, in_channels=4, out_channels=4, model_channels=32,
                                         cond_channels=16, num_blocks=1, num_heads=2, mlp_ratio=2.0))
    dense_vae = build_model("dense_shape_vae", dict(
        latent_channels=4, encoder_channels=[8, 8, 8], num_res_blocks_encoder=1, num_res_blocks_middle_encoder=1,
        decoder_channels=[8, 8, 8], num_res_blocks_decoder=1, num_res_blocks_middle_decoder=1))
    stage = StageSettings(steps=2, guidance_scale=3.0, shift=3.0)
    settings = PipelineSettings(dense=stage, sparse={64: stage, 128: stage},
                                occupancy_threshold=TINY_OCCUPANCY_THRESHOLD)
    pipe = ImageTo3DPipeline(enc, dense_dit, dense_vae, {64: _sparse_dit(8, True), 128: _sparse_dit(16, False)},
                             {64: _sparse_vae(), 128: _sparse_vae()}, settings)
    with torch.no_grad():
        for module in pipe.components().values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return pipe


def rgba_image(size: int = 40) -> np.ndarray:
    """uint8 [size, size, 4]: a red rectangle with a green stripe on a transparent background."""
    img = np.zeros((size, size, 4), np.uint8)
    img[size // 4: 3 * size // 4, 3 * size // 10: 7 * size // 10] = (200, 50, 50, 255)
    img[size // 2: size // 2 + 3, 3 * size // 10: 7 * size // 10, :3] = (40, 200, 40)
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width × height`` RGBA pixels and whose data is empty (a decompression bomb's
    shape: the size is known before any pixel is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def stored_image_variants(size: int = 40) -> dict[str, tuple[bytes, np.ndarray]]:
    """Image files whose stored pixels differ from what a viewer shows → (file bytes, the uint8 RGB(A) array a
    reader must return): an EXIF-rotated photo (PNG, TIFF), a 16-bit grayscale PNG, a float grayscale TIFF, an RGB
    PNG with a tRNS key colour and an RGBA PNG whose alpha is opaque everywhere (no object mask: read as RGB, so
    the background is estimated)."""
    from PIL import Image

    upright = np.full((size, 2 * size, 3), 255, np.uint8)  # landscape: a red block left, a blue one right
    upright[size // 4: 3 * size // 4, 2:size // 2] = (200, 30, 30)
    upright[size // 4: 3 * size // 4, -size // 2:-2] = (30, 30, 200)
    variants = {}

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to show; the stored pixels are turned counter-clockwise
    buf = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buf, format="PNG", exif=exif)
    variants["exif rotated"] = (buf.getvalue(), upright)

    buf = io.BytesIO()  # a TIFF keeps the tag in its own image directory
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buf, format="TIFF", exif=exif)
    variants["exif rotated TIFF"] = (buf.getvalue(), upright)

    gray = upright.min(axis=2)
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="PNG")  # mode I;16
    variants["16-bit gray"] = (buf.getvalue(), np.repeat(gray[..., None], 3, axis=2))

    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.float32) / 255.0).save(buf, format="TIFF")  # mode F, values in [0, 1]
    variants["float gray"] = (buf.getvalue(), np.repeat(gray[..., None], 3, axis=2))

    buf = io.BytesIO()
    Image.fromarray(upright).save(buf, format="PNG", transparency=(255, 255, 255))
    alpha = np.where((upright == 255).all(axis=2), 0, 255).astype(np.uint8)
    variants["tRNS key colour"] = (buf.getvalue(), np.concatenate([upright, alpha[..., None]], axis=2))

    buf = io.BytesIO()
    Image.fromarray(upright).convert("RGBA").save(buf, format="PNG")
    variants["opaque alpha"] = (buf.getvalue(), upright)
    return variants


def damaged_exif_images(size: int = 40) -> dict[str, tuple[bytes, str, np.ndarray]]:
    """Image files whose EXIF block (orientation 6, as in ``stored_image_variants``' "exif rotated") is damaged →
    (file bytes, the format, the upright image a reader returns: turned when the orientation tag can still be read,
    as stored otherwise). The JPEGs' blocks are read by PIL as the file opens (for its dpi), the PNGs' later."""
    from PIL import Image

    upright = np.full((size, 2 * size, 3), 255, np.uint8)
    upright[size // 4: 3 * size // 4, 2:size // 2] = (200, 30, 30)
    stored = np.ascontiguousarray(np.rot90(upright))  # ROTATE_90: counter-clockwise
    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription: ASCII, its data stored after the directory
    exif[0x0112] = 6
    exif[0x011A] = 72.0  # XResolution: a rational
    block = exif.tobytes()  # b"Exif\0\0" + big-endian TIFF header (8 bytes) + entry count + 12-byte entries
    count_at, first_entry = 14, 16

    def entry(tag: int) -> int:
        count = struct.unpack(">H", block[count_at:count_at + 2])[0]
        return next(first_entry + 12 * i for i in range(count)
                    if struct.unpack(">H", block[first_entry + 12 * i:first_entry + 12 * i + 2])[0] == tag)

    too_many = bytearray(block)
    too_many[count_at:count_at + 2] = struct.pack(">H", 50)  # more entries than the block holds
    description_far = bytearray(block)
    offset_at = entry(0x010E) + 8
    description_far[offset_at:offset_at + 4] = struct.pack(">I", 5000)  # its data past the end: unreadable
    resolution_as_text = bytearray(block)
    type_at = entry(0x011A) + 2
    resolution_as_text[type_at:type_at + 2] = struct.pack(">H", 2)  # readable, but PIL cannot write it back
    cases = {
        "entry count past the block (JPEG)": (bytes(too_many), "JPEG", upright),
        "tag data past the block (JPEG)": (bytes(description_far), "JPEG", stored),
        "not a TIFF header (PNG)": (b"Exif\0\0XX\0*\0\0\0\x08", "PNG", stored),
        "a rational stored as text (PNG)": (bytes(resolution_as_text), "PNG", upright),
    }
    out = {}
    for name, (exif_bytes, fmt, expected) in cases.items():
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format=fmt, exif=exif_bytes)
        out[name] = (buf.getvalue(), fmt, expected)
    return out
