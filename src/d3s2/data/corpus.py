"""The 0 A.D. mesh corpus: 4010 real game-asset meshes in one npz (CC-BY-SA-3.0, Wildfire Games).

File format (``0ad_meshes.npz``): for each mesh two arrays keyed by its path inside the game's ``public.zip``
with ``/`` replaced by ``|``: ``"<path>|v"`` float32 ``[V, 3]`` and ``"<path>|f"`` uint16 ``[F, 3]``.
:func:`d3s2.geometry.pmd.pmd_zip_to_npz` rebuilds it from the Debian package ``0ad-data``.

Meshes are named by that path without ``art/meshes/`` and the ``.dae.cached.pmd`` suffix, e.g.
``gaia/bamboo_1``; the first component is the category (props, structural, gaia, skeletal, temp, test).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..fileio import atomic_write

ENV_VAR = "D3S2_0AD_NPZ"
DEFAULT_RELATIVE_PATH = Path("..") / "shared" / "data" / "0ad_meshes.npz"
ATTRIBUTION = "0 A.D. art assets (c) Wildfire Games, CC-BY-SA-3.0 (https://play0ad.com)"
_PREFIX = "art|meshes|"
_SUFFIX = re.compile(r"(\.dae)?(\.cached)?\.pmd$")


def find_corpus(path: str | os.PathLike | None = None) -> Path:
    """Locate the corpus npz: ``path``, else ``$D3S2_0AD_NPZ``, else ``../shared/data/0ad_meshes.npz``.

    Raises:
        FileNotFoundError: naming every place looked at.
    """
    tried = []
    for cand, origin in ((path, "argument"), (os.environ.get(ENV_VAR), f"${ENV_VAR}"),
                         (DEFAULT_RELATIVE_PATH, "default")):
        if not cand:
            continue
        p = Path(cand)
        if p.is_file():
            return p
        tried.append(f"{p} ({origin})")
    raise FileNotFoundError("0 A.D. corpus npz not found; looked at " + ", ".join(tried)
                            + f". Pass its path (`--corpus` on the command line) or set {ENV_VAR}.")


def _name_from_key(key: str) -> str:
    stem = key.rsplit("|", 1)[0]
    stem = stem[len(_PREFIX):] if stem.startswith(_PREFIX) else stem
    return _SUFFIX.sub("", stem.replace("|", "/"))


class MeshCorpus:
    """Read-only access to an npz mesh corpus (the 0 A.D. format above); arrays load lazily, one mesh at a time.

    Example::

        corpus = MeshCorpus()                 # finds the npz (see find_corpus)
        corpus.names("gaia")[:2]              # ['gaia/acacia_bush_small_1', 'gaia/bamboo_1']
        mesh = corpus.mesh("gaia/bamboo_1")   # validated trimesh.Trimesh
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = find_corpus(path)
        self._npz = np.load(self.path, allow_pickle=False)
        self._keys: dict[str, str] = {}
        for key in self._npz.files:
            if key.endswith("|v"):
                self._keys[_name_from_key(key)] = key[:-2]
        if not self._keys:
            raise ValueError(f"{self.path}: no '<path>|v' arrays; not a mesh corpus npz")

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def names(self, category: str | None = None) -> list[str]:
        """Sorted mesh names, optionally only those of one category."""
        names = sorted(self._keys)
        if category is None:
            return names
        if category not in self.categories():
            raise ValueError(f"unknown category {category!r}, expected one of {self.categories()}")
        return [n for n in names if n.split("/", 1)[0] == category]

    def categories(self) -> list[str]:
        return sorted({n.split("/", 1)[0] for n in self._keys})

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``vertices`` float32 ``[V, 3]`` and ``faces`` int64 ``[F, 3]`` of one mesh."""
        if name not in self._keys:
            raise KeyError(f"{name!r} is not in {self.path} ({len(self)} meshes)")
        key = self._keys[name]
        return self._npz[f"{key}|v"].astype(np.float32), self._npz[f"{key}|f"].astype(np.int64)

    def mesh(self, name: str):
        """One mesh as a validated, outward-facing ``trimesh.Trimesh`` (``MeshError`` naming it if unusable).

        0 A.D. stores triangles clockwise (352 of the 353 watertight corpus meshes have negative signed volume
        in file order), so the winding is reversed here; :meth:`arrays` keeps the file order.
        """
        from d3s2.geometry.mesh_io import validate_mesh

        vertices, faces = self.arrays(name)
        return validate_mesh(vertices, faces[:, ::-1].copy(), f"0ad:{name}")

    def close(self) -> None:
        self._npz.close()


def save_corpus(path: str | os.PathLike, meshes: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write ``{name: (vertices [V, 3], faces [F, 3])}`` in the corpus format (names as :class:`MeshCorpus` gives).

    Written atomically; faces must fit uint16.
    """
    arrays = {}
    for name, (v, f) in meshes.items():
        f = np.asarray(f)
        if f.size and f.max() > np.iinfo(np.uint16).max:
            raise ValueError(f"{name}: face index {f.max()} does not fit uint16")
        key = _PREFIX + name.replace("/", "|") + ".dae.cached.pmd"
        arrays[f"{key}|v"] = np.asarray(v, np.float32)
        arrays[f"{key}|f"] = f.astype(np.uint16)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
