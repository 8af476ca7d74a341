"""Image → 3D pipeline: :class:`~d3s2.pipeline.image_to_3d.ImageTo3DPipeline` (also ``from d3s2.pipeline import
ImageTo3DPipeline, PipelineSettings``), ``d3s2 generate``, evaluation.

The demo pipeline (small models trained here on the 0 A.D. corpus at 256³) ships inside the package at
``d3s2/assets/demo_pipeline/`` (a folder written by ``ImageTo3DPipeline.save_pretrained``), so a ``pip install``
reaches it like a source checkout; :func:`demo_weights` finds it, and ``d3s2 generate`` uses it when no
``--weights`` / ``$D3S2_WEIGHTS`` is given.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_PIPELINE = "demo_pipeline"  # folder under d3s2/assets
# Re-exported from d3s2.pipeline.image_to_3d on first use (PEP 562): `import d3s2.pipeline` stays free of torch.
_FROM_IMAGE_TO_3D = ("ImageTo3DPipeline", "PipelineSettings", "StageSettings")
__all__ = ["DEMO_PIPELINE", "demo_weights", "demo_weights_dir", *_FROM_IMAGE_TO_3D]


def __getattr__(name: str) -> Any:
    if name in _FROM_IMAGE_TO_3D:
        return getattr(importlib.import_module(f"{__name__}.image_to_3d"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def demo_weights_dir() -> Path:
    """Where the bundled demo pipeline lives (it may be missing: see :func:`demo_weights`)."""
    return Path(str(resources.files("d3s2") / "assets" / DEMO_PIPELINE))


def demo_weights() -> Path:
    """The bundled demo pipeline folder.

    Raises:
        FileNotFoundError: the folder or its ``pipeline.json`` is missing (a build without the demo weights).
    """
    root = demo_weights_dir()
    if not (root / "pipeline.json").is_file():
        raise FileNotFoundError(f"the bundled demo pipeline is missing (expected {root / 'pipeline.json'}); "
                                "pass --weights DIR (a d3s2 pipeline folder) or set $D3S2_WEIGHTS")
    return root
