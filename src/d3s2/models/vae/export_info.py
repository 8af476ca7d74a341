"""What a ``vae`` task export records beside its weights (``vae_task.json``) and the checks built on it.

``vae_task.json``: ``band`` (the τ the SS-VAE was trained with), ``resolutions`` (those it was trained at),
``val_fraction`` and ``test_fraction`` (its train/val/test split, :func:`d3s2.data.dataset.split_of`; absent in
exports written before they were recorded).

``d3s2 reconstruct``, ``d3s2 eval vae`` and ``d3s2 data encode`` feed the SS-VAE SDF / τ with τ = an explicit band,
else the file's, else :data:`DEFAULT_BAND` (:func:`resolve_band`). A built data folder holds SDF values within its
own build band, so the inputs span ±(build band / τ): :func:`check_data_matches` refuses a build band more than
:data:`MAX_BAND_RATIO` away from τ (inputs far from the [-1, 1] the model saw) unless the band is explicit.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASK_FILE = "vae_task.json"
DEFAULT_BAND = 1 / 128  # the paper's band, that of the bundled demo SS-VAE
# The split of exports that do not record theirs: the defaults of the vae task.
DEFAULT_SPLIT = {"val_fraction": 0.05, "test_fraction": 0.05}
MAX_BAND_RATIO = 2.0


def read_task_file(weights: str | os.PathLike) -> dict[str, Any]:
    """The ``vae_task.json`` beside ``weights`` (``{}`` when there is none)."""
    path = Path(weights) / TASK_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def resolve_band(explicit: float | None, info: dict[str, Any], weights: str | os.PathLike) -> float:
    """The band τ the SS-VAE is fed with: ``explicit``, else the ``band`` of its ``vae_task.json`` (``info``),
    else :data:`DEFAULT_BAND` (with a warning: the weights do not say)."""
    if explicit is not None:
        return float(explicit)
    if "band" in info:
        return float(info["band"])
    log.warning("%s has no %s recording the band it was trained with: assuming %g (pass --band to choose)",
                weights, TASK_FILE, DEFAULT_BAND)
    return DEFAULT_BAND


def check_data_matches(info: dict[str, Any], *, data: str | os.PathLike, data_band: float, band: float,
                       resolutions: Sequence[int], explicit_band: bool) -> None:
    """Check a built data folder (band ``data_band``, used at ``resolutions``) against the SS-VAE fed with ``band``
    (see :func:`resolve_band`; ``info``: its ``vae_task.json``).

    Warns once when the folder's band or resolutions differ from those the file records. Raises ValueError when
    the bands differ by more than :data:`MAX_BAND_RATIO` and ``explicit_band`` is False.
    """
    if not explicit_band and max(data_band / band, band / data_band) > MAX_BAND_RATIO:
        source = f"its {TASK_FILE}" if "band" in info else f"the default, as there is no {TASK_FILE}"
        raise ValueError(f"{data} was built with band {data_band:g} but the SS-VAE takes band {band:g} ({source}): "
                         f"its inputs would span ±{data_band / band:g} instead of the ±1 it was trained on; use "
                         "data built with the VAE's band, or pass --band to override")
    differences = []
    if "band" in info and not math.isclose(data_band, float(info["band"]), rel_tol=1e-6):
        differences.append(f"band {data_band:g} (the SS-VAE was trained with {float(info['band']):g})")
    untrained = sorted(set(resolutions) - set(info.get("resolutions", resolutions)))
    if untrained:
        differences.append(f"resolution {', '.join(map(str, untrained))} (the SS-VAE was trained at "
                           f"{', '.join(map(str, info['resolutions']))})")
    if differences:
        log.warning("%s differs from the SS-VAE in %s", data, " and ".join(differences))


def split_fractions(info: dict[str, Any], weights: str | os.PathLike) -> dict[str, float]:
    """``{"val_fraction", "test_fraction"}`` of the split the SS-VAE was trained with (its ``vae_task.json``);
    :data:`DEFAULT_SPLIT`, with a warning, for exports that do not record it."""
    if all(k in info for k in DEFAULT_SPLIT):
        return {k: float(info[k]) for k in DEFAULT_SPLIT}
    log.warning("%s does not record the split the SS-VAE was trained with (an older export): using val_fraction "
                "%g and test_fraction %g, so the scored split may hold shapes it was trained on",
                Path(weights) / TASK_FILE, *DEFAULT_SPLIT.values())
    return dict(DEFAULT_SPLIT)
