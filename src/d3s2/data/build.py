"""Build a training set: every mesh → normalised mesh → sparse SDF at several resolutions + conditioning renders.

Output directory layout::

    OUT/build.json              the build settings; once an asset is written, or while a build with them runs
                                (shards started together), a build with other settings is refused
    OUT/build.json.lock         held while a build checks or writes build.json
    OUT/build.running.lock      held (shared) by every build running into OUT
    OUT/manifest[.i-of-n].jsonl one JSON line per attempt (per shard when sharded); the latest line wins
    OUT/assets/<name>.npz       one file per finished asset, written atomically (temp file + os.replace)

Asset npz keys (see :func:`load_asset`): ``name``; ``normalize/center`` float64 ``[3]`` and ``normalize/scale``
(the :class:`NormalizeTransform` that maps the source mesh into [-1, 1]³); ``sdf<R>/<key>`` for each resolution
R and each array of ``SparseSDF.to_arrays()``; ``render/png`` uint8 (the PNG files of all views concatenated),
``render/png_offsets`` int64 ``[V+1]``, and the camera arrays of :class:`d3s2.geometry.render.Renders`
(``render/intrinsics`` ``[V, 3, 3]``, ``render/world_to_camera`` ``[V, 4, 4]``, ...). Renders and cameras live
in the normalised frame, the same frame as the SDF.

An asset is finished when its file exists; a re-run skips finished assets and retries the others. Failures
(unreadable or degenerate meshes: the ``MeshError`` message; anything else: the exception) are recorded in the
manifest and the job goes on, as it does when a worker process is killed (``--workers`` > 1: the OOM killer on a
huge mesh; the assets then in progress are retried after the others, each alone, see :func:`_build_apart`). A
build killed outright (``--workers`` 1 and the OOM killer, or SIGKILL) leaves the temp file of the asset it was
building, and a re-run builds that asset last, alone in a worker process, so a mesh that kills whatever builds it
is recorded failed instead of stopping every re-run; the workers of such a build end within a second. An output
folder that is full, read-only or not writable stops the build at the first asset it cannot write
(:class:`OutputNotWritable`). Ctrl-C or SIGTERM stops the workers (the exit code is 130 / 143; a signal the process
was started with ignored stays ignored) and a re-run resumes. Everything is deterministic in the asset name and
``seed``.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import signal
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX (Windows): builds go on without the shard check (``_lock_if_supported``)
    fcntl = None

from ..fileio import atomic_write_text
from ..progress import CountProgress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Errors writing an asset file that every later asset would hit too: the build stops instead of failing them all.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf", ".pmd")
# Files that come with meshes (materials, textures, glTF buffers): skipped in a folder without a warning.
COMPANION_EXTENSIONS = frozenset({".mtl", ".bin", ".png", ".jpg", ".jpeg", ".tga", ".bmp", ".dds", ".tif", ".tiff",
                                  ".webp", ".ktx", ".ktx2"})
CORPUS_PREFIX = "0ad"


@dataclass(kw_only=True)
class BuildConfig:
    resolutions: tuple[int, ...] = (256, 512)  # SDF grid sizes, each a multiple of 8
    views: int = 8  # conditioning renders per asset
    image_size: int = 518  # render width = height in pixels (DINOv2 ViT-L/14 input size)
    band: float = 1 / 128  # |sdf| < band, in [-1, 1] units
    scale: float = 0.95  # the normalised mesh fills [-scale, scale]³
    seed: int = 0  # camera sampling seed (combined with the asset name)
    device: str = "cpu"  # where the SDF is computed

    def __post_init__(self) -> None:
        from d3s2.geometry.sdf import MAX_RESOLUTION

        # Checked here, not as each asset fails on them.
        self.resolutions = tuple(int(r) for r in self.resolutions)
        if not self.resolutions or any(r < 8 or r % 8 or r > MAX_RESOLUTION for r in self.resolutions):
            raise ValueError(f"expected resolutions that are multiples of 8 in [8, {MAX_RESOLUTION}], got "
                             f"{self.resolutions}")
        if self.views < 0:
            raise ValueError(f"expected views >= 0, got {self.views}")
        if self.image_size < 1:
            raise ValueError(f"expected image_size >= 1, got {self.image_size}")
        if not 0 < self.band < 1:
            raise ValueError(f"expected 0 < band < 1, got {self.band}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"expected 0 < scale <= 1, got {self.scale}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["resolutions"] = list(self.resolutions)
        d.pop("device")  # where it ran does not change the data
        return d


@dataclass(frozen=True, order=True)
class AssetSource:
    """One mesh to build: ``name`` is unique in the build and names its output file."""

    name: str
    path: str  # the mesh file, or the corpus npz when ``corpus_name`` is set
    corpus_name: str | None = None


class OutputNotWritable(OSError):
    """An asset file could not be written for a reason of the output folder (full, read-only, no permission)."""


@dataclass
class BuildSummary:
    total: int = 0  # assets of this shard
    skipped: int = 0  # already finished before this run
    built: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- sources
def _hash_unit(text: str) -> float:
    """A stable number in [0, 1) from a string (independent of Python's salted hash)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") / 2**64


def resolve_sources(sources: Sequence[str], *, corpus_path: str | None = None) -> list[AssetSource]:
    """Expand SOURCE arguments into assets sorted by name.

    A SOURCE is ``0ad`` or ``0ad:<category>`` (the built-in corpus, see :mod:`d3s2.data.corpus`), a folder
    (every mesh file below it), a glob, or one mesh file. Names: ``0ad/<corpus name>`` for the corpus, and
    ``<folder name>/<path below it>`` (extension kept) for files.

    Raises:
        FileNotFoundError: a SOURCE that matches nothing. ValueError: two assets with the same name.
    """
    assets: dict[str, AssetSource] = {}

    def add(a: AssetSource) -> None:
        if a.name in assets and assets[a.name] != a:
            raise ValueError(f"two assets are named {a.name!r}: {assets[a.name].path} and {a.path}")
        assets[a.name] = a

    for src in sources:
        if src == CORPUS_PREFIX or src.startswith(CORPUS_PREFIX + ":"):
            from d3s2.data.corpus import MeshCorpus

            corpus = MeshCorpus(corpus_path)
            category = src.partition(":")[2] or None
            for n in corpus.names(category):
                add(AssetSource(f"{CORPUS_PREFIX}/{n}", str(corpus.path.resolve()), n))
            continue
        p = Path(src)
        if p.is_dir():
            files, base = _files_below(p), p
        elif p.is_file():
            files, base = [p], p.parent
        else:
            files = [Path(f) for f in glob.glob(src, recursive=True) if Path(f).is_file()]
            magic = min((i for i, ch in enumerate(src) if ch in "*?["), default=len(src))
            base = Path(src[:magic].rsplit("/", 1)[0] or ".") if "/" in src[:magic] else Path(".")
        if not p.is_file():
            others = Counter(f.suffix.lower() or "no extension" for f in files
                             if f.suffix.lower() not in (*MESH_EXTENSIONS, *COMPANION_EXTENSIONS))
            if others:  # e.g. .fbx or .blend files a user expected to be built
                count = others.total()
                log.warning("SOURCE %r: %d %s skipped, not a mesh format d3s2 reads (%s); expected %s", src, count,
                            "file" if count == 1 else "files",
                            ", ".join(f"{ext} x{n}" for ext, n in sorted(others.items())), ", ".join(MESH_EXTENSIONS))
            files = [f for f in files if f.suffix.lower() in MESH_EXTENSIONS]
        if not files:
            raise FileNotFoundError(f"SOURCE {src!r} matches no mesh file ({', '.join(MESH_EXTENSIONS)})")
        prefix, root = base.resolve().name, Path(os.path.abspath(base))
        for f in files:
            # Links not followed: a linked file (Hugging Face, git-annex and DVC caches link to extensionless
            # blobs outside the folder) keeps the name and the extension of its link.
            path = Path(os.path.abspath(f))
            rel = path.relative_to(root).as_posix()
            add(AssetSource(f"{prefix}/{rel}" if prefix else rel, str(path)))
    return sorted(assets.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"expected --shard i/n such as 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"expected 0 <= i < n in --shard i/n, got {text!r}")
    return i, n


def _files_below(folder: Path) -> list[Path]:
    """Every file below ``folder``, through linked sub-folders too (each real folder once, so a link cycle ends)."""
    seen, found = set(), []
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [path for path in (Path(top, f) for f in files) if path.is_file()]
    return found


def select(assets: Sequence[AssetSource], *, shard: tuple[int, int] = (0, 1), subset: int | None = None,
           seed: int = 0) -> list[AssetSource]:
    """Deterministic random ``subset`` (by a hash of seed and name), then this shard's part (by a hash of name).

    Shards partition the (subset) list: every asset belongs to exactly one of the n shards.
    """
    chosen = list(assets)
    if subset is not None and subset < 0:
        raise ValueError(f"expected a subset of K >= 0 assets, got {subset}")
    if subset is not None:
        chosen = sorted(sorted(chosen, key=lambda a: _hash_unit(f"subset:{seed}:{a.name}"))[:subset])
    i, n = shard
    return [a for a in chosen if int(_hash_unit(f"shard:{a.name}") * n) == i]


def asset_path(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / "assets" / f"{name}.npz"


_DAMAGED_ARCHIVE = (zipfile.BadZipFile, zlib.error, EOFError)  # what reading a cut or corrupted .npz member raises


@contextmanager
def open_asset(path: str | os.PathLike) -> Iterator[np.lib.npyio.NpzFile]:
    """The arrays of one asset file of a built (``d3s2 data build``) or encoded (``d3s2 data encode``) folder, read
    as they are indexed. A file that is no such archive (overwritten, cut short, corrupted) is a ValueError naming
    it, whether opening it or reading an array fails (numpy's own errors name neither the file nor the fix)."""
    def damaged(err: BaseException) -> ValueError:
        return ValueError(f"{path}: not a readable d3s2 asset archive ({err}); expected an .npz written by "
                          "`d3s2 data build` or `d3s2 data encode`: rebuild that folder, or remove the file")

    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, *_DAMAGED_ARCHIVE) as err:
        raise damaged(err) from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise damaged(TypeError("a single .npy array"))
    with z:
        try:
            yield z
        except _DAMAGED_ARCHIVE as err:
            raise damaged(err) from err


# ---------------------------------------------------------------------------------------------- one asset
_CORPORA: dict[str, object] = {}  # per process: npz path -> MeshCorpus, opened once


def load_source_mesh(asset: AssetSource):
    """The asset's mesh as a validated ``trimesh.Trimesh`` (raises ``MeshError``/``PMDError`` with a reason)."""
    if asset.corpus_name is not None:
        from d3s2.data.corpus import MeshCorpus

        if asset.path not in _CORPORA:
            _CORPORA[asset.path] = MeshCorpus(asset.path)
        return _CORPORA[asset.path].mesh(asset.corpus_name)
    if asset.path.lower().endswith(".pmd"):
        from d3s2.geometry.pmd import load_pmd

        return load_pmd(asset.path)
    from d3s2.geometry.mesh_io import load_mesh

    return load_mesh(asset.path)


def build_asset(asset: AssetSource, config: BuildConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Compute one asset's arrays (the npz content, see the module docstring) and its manifest stats."""
    from d3s2.geometry.mesh_io import normalize_mesh
    from d3s2.geometry.render import encode_png, render_views
    from d3s2.geometry.sdf import compute_sparse_sdf

    t0 = time.perf_counter()
    mesh = load_source_mesh(asset)
    stats: dict = {"vertices": int(len(mesh.vertices)), "triangles": int(len(mesh.faces))}
    mesh, transform = normalize_mesh(mesh, scale=config.scale)
    # Merged in the unit cube: trimesh merges within an absolute 1e-8, which at 1e12 collapses every vertex into one.
    merged = mesh.copy()
    merged.merge_vertices()  # STL and seam-split files repeat the vertices of closed surfaces
    stats["watertight"] = bool(merged.is_watertight)
    arrays: dict[str, np.ndarray] = {
        "name": np.array(asset.name),
        "normalize/center": np.asarray(transform.center, np.float64),
        "normalize/scale": np.asarray(transform.scale, np.float64),
    }
    t1 = time.perf_counter()
    sdfs = compute_sparse_sdf(mesh, list(config.resolutions), band=config.band, device=config.device,
                              warn_narrow_band=False)  # build() warns once for all assets
    stats["voxels"], stats["blocks"] = {}, {}
    for res in config.resolutions:
        sdf = sdfs[res]
        for key, value in sdf.to_arrays().items():
            arrays[f"sdf{res}/{key}"] = np.asarray(value)
        stats["voxels"][str(res)] = len(sdf)
        stats["blocks"][str(res)] = int(len(sdf.block_coords))  # occupied 8³ blocks, the decoder's output
    t2 = time.perf_counter()
    if config.views:
        renders = render_views(mesh, config.views, size=config.image_size, seed=config.seed, key=asset.name)
        pngs = [encode_png(im) for im in renders.images]
        arrays["render/png"] = np.frombuffer(b"".join(pngs), np.uint8)
        arrays["render/png_offsets"] = np.cumsum([0] + [len(p) for p in pngs]).astype(np.int64)
        for key, value in renders.camera_arrays().items():
            arrays[f"render/{key}"] = value
    t3 = time.perf_counter()
    stats.update(seconds_load=round(t1 - t0, 4), seconds_sdf=round(t2 - t1, 4), seconds_render=round(t3 - t2, 4))
    return arrays, stats


def temp_path(path: Path, tmp_tag: str = "") -> Path:
    """This process's temp file for ``path``: ``<name>.tmp<tmp_tag>-<pid>`` (see :func:`remove_stale_temps`)."""
    return path.with_name(f"{path.name}.tmp{tmp_tag}-{os.getpid()}")


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], tmp_tag: str = "") -> None:
    """Write a compressed npz via a temp file in the same folder (:func:`temp_path`) and ``os.replace`` (never a
    partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, tmp_tag)
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())  # else a power loss can leave an empty file under the final name: a "done" asset
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_record(asset: AssetSource) -> dict:
    return {"name": asset.name, "source": asset.path if asset.corpus_name is None
            else f"{asset.path}:{asset.corpus_name}"}


@contextmanager
def _output_errors(path: Path, out: str) -> Iterator[None]:
    """An OSError of a full, read-only or unwritable output folder as :class:`OutputNotWritable`."""
    try:
        yield
    except OSError as err:
        if err.errno in OUTPUT_ERRNOS:
            raise OutputNotWritable(f"cannot write {path}: {err.strerror}; the build stops (every later asset would "
                                    f"fail too): make room or fix {out}, then re-run, which keeps the finished "
                                    "assets") from None
        raise


def process_asset(asset: AssetSource, config: BuildConfig, out: str, tmp_tag: str = "") -> dict:
    """Build and write one asset; returns its manifest record (``status`` ok or failed, with ``error``)."""
    t0 = time.perf_counter()
    record = _new_record(asset)
    path = asset_path(out, asset.name)
    # The temp file is there from the start: a process killed while building (the OOM killer) leaves it behind,
    # which tells the next run which asset to build apart (see build()).
    marker = temp_path(path, tmp_tag)
    try:
        with _output_errors(path, out):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        arrays, stats = build_asset(asset, config)
        with _output_errors(path, out):
            write_npz_atomic(path, arrays, tmp_tag)
        record.update(status="ok", error=None, **stats)
    except OutputNotWritable:
        raise
    except Exception as err:  # a batch job records any failure and goes on
        from d3s2.geometry.mesh_io import MeshError

        reason = str(err) if isinstance(err, MeshError) else f"{type(err).__name__}: {err}"
        record.update(status="failed", error=reason)
    finally:
        marker.unlink(missing_ok=True)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return record


# ---------------------------------------------------------------------------------------------- manifest
def manifest_path(out: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> Path:
    i, n = shard
    return Path(out) / ("manifest.jsonl" if n == 1 else f"manifest.{i}-of-{n}.jsonl")


def read_manifest(out: str | os.PathLike) -> dict[str, dict]:
    """The latest record per asset name over every ``manifest*.jsonl`` in ``out`` (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for path in sorted(Path(out).glob("manifest*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            prev = records.get(rec.get("name"))
            if prev is None or rec.get("finished", "") >= prev.get("finished", ""):
                records[rec["name"]] = rec
    return records


@contextmanager
def _bound_settings(out: Path, config: BuildConfig) -> Iterator[None]:
    """Write ``config`` as ``build.json``, or check it against the one there, and hold it for the build inside.

    Those settings bind once an asset is written, and while a build with them runs (shards started together into
    one folder); otherwise (a build stopped at once, or one whose every asset failed) the new ones replace them.
    Each build holds a shared lock on ``build.running.lock`` while it runs, and checks or writes ``build.json``
    under an exclusive lock on ``build.json.lock``: of two shards with other settings, exactly one goes on.
    """
    settings = {"format_version": FORMAT_VERSION, **config.to_json()}
    path = out / "build.json"
    out.mkdir(parents=True, exist_ok=True)
    running = open(out / "build.running.lock", "a")
    try:
        with open(out / "build.json.lock", "a") as checking:
            locked = _lock_if_supported(checking, out)  # released when closed
            old = json.loads(path.read_text()) if path.exists() else None
            if old != settings:
                if old is not None:
                    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                    if _has_assets(out):
                        raise ValueError(f"{out} was built with other settings (old, new): {diff}; use another --out")
                    if locked:
                        try:
                            fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if no build runs there now
                        except BlockingIOError:
                            raise ValueError(f"another build with other settings is running into {out} (theirs, "
                                             f"yours): {diff}; wait for it to end, or use its settings or another "
                                             "--out") from None
                    log.info("%s holds no asset yet: its build settings change (old, new): %s", out, diff)
                atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
            if locked:
                fcntl.flock(running, fcntl.LOCK_SH)  # under the exclusive check lock: no other build takes it between
        yield
    finally:
        running.close()


def _lock_if_supported(file: IO, out: Path) -> bool:
    """An exclusive lock on ``file``; False, with a warning, on a file system or platform without file locks."""
    if fcntl is None:  # not POSIX (Windows): build as before, without the shard check
        log.warning("no fcntl on this platform: shards started together with other settings into %s are not "
                    "detected", out)
        return False
    try:
        fcntl.flock(file, fcntl.LOCK_EX)
    except OSError as err:
        # Lustre mounted without -o flock, some FUSE and NFS setups: build as before, without the shard check.
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        log.warning("%s: this file system has no file locks (%s); shards started together with other settings "
                    "into it are not detected", out, err)
        return False
    return True


def _has_assets(out: Path) -> bool:
    return next((out / "assets").rglob("*.npz"), None) is not None  # temp files end in -<pid>, not .npz


def remove_stale_temps(out: Path, tmp_tag: str = "") -> set[str]:
    """Remove the temp files (:func:`temp_path`) under ``out/assets`` that carry ``tmp_tag`` and whose process has
    ended (a run killed amid an asset); those of a running process (another shard's) stay. Returns the names of
    their assets."""
    assets, names = out / "assets", set()
    for f in assets.rglob(f"*.npz.tmp{tmp_tag}-*"):
        pid = f.name.rpartition("-")[2]
        if not (pid.isdigit() and _process_alive(int(pid))):
            f.unlink(missing_ok=True)
            relative = f.relative_to(assets).as_posix()
            names.add(relative[:relative.rindex(".npz.tmp")])
    return names


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an ended process's that had this pid: this one removes its own temp file as it goes
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


_STARTED = None  # in a worker process: where it names each asset it starts (``_process_in_worker``)


def _init_worker(threads: int, build_pid: int, started) -> None:
    global _STARTED
    import torch

    torch.set_num_threads(threads)
    _STARTED = started
    threading.Thread(target=_exit_when_orphaned, args=(build_pid,), daemon=True, name="orphan-check").start()


def _process_in_worker(asset: AssetSource, config: BuildConfig, out: str, tmp_tag: str) -> dict:
    _STARTED.put(asset.name)
    return process_asset(asset, config, out, tmp_tag)


def _exit_when_orphaned(build_pid: int) -> None:
    # A build killed outright (SIGKILL: the OOM killer, kill -9) cannot stop its workers, and a worker waits on the
    # pool's queue forever (it holds that pipe's write end itself): it ends once it has another parent.
    while os.getppid() == build_pid:
        time.sleep(1)
    os._exit(1)


@contextmanager
def _signal_handler(signum: int, handler: Callable | int) -> Iterator[None]:
    """``handler`` for ``signum`` while entered in the main thread (Python sets handlers there only), else nothing.
    A signal the process was started with ignored stays ignored: its parent meant it to be immune."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # An exception, unlike the default death, runs the cleanup: workers stopped, temp files removed.
    raise SystemExit(128 + signum)


def build(assets: Iterable[AssetSource], out: str | os.PathLike, config: BuildConfig, *, workers: int = 1,
          shard: tuple[int, int] = (0, 1), progress: bool = True) -> BuildSummary:
    """Build every asset of ``assets`` not finished yet into ``out``; see the module docstring.

    ``assets`` should already be this shard's part (:func:`select`); ``shard`` names its manifest and temp files.
    A band narrower than one voxel at some resolution is warned about once, before the first asset.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: expected an output folder (or a path to create one at), found a file")
    with _bound_settings(out, config):
        tmp_tag = f"-s{shard[0]}of{shard[1]}"
        # Assets whose process died while building them (a temp file left behind) are built last, each alone.
        interrupted = remove_stale_temps(out, tmp_tag) if (out / "assets").exists() else set()
        assets = list(assets)
        summary = BuildSummary(total=len(assets))
        todo = [a for a in assets if not asset_path(out, a.name).exists()]
        summary.skipped = len(assets) - len(todo)
        if todo:
            from d3s2.geometry.sdf import warn_narrow_band_at

            warn_narrow_band_at(config.band, config.resolutions)  # once here, not once per asset
        _build_todo(todo, out, config, summary, workers=workers, shard=shard, tmp_tag=tmp_tag, progress=progress,
                    apart={a.name for a in todo} & interrupted)
        return summary


def _build_todo(todo: list[AssetSource], out: Path, config: BuildConfig, summary: BuildSummary, *, workers: int,
                shard: tuple[int, int], tmp_tag: str, progress: bool, apart: set[str]) -> None:
    """Build ``todo`` into ``out``, recording each attempt in the manifest and in ``summary``; the assets named in
    ``apart`` last, each alone in a process of its own (:func:`_build_apart`)."""
    t0 = time.perf_counter()
    with (_signal_handler(signal.SIGTERM, _exit_on_sigterm), open(manifest_path(out, shard), "a") as manifest,
          CountProgress(len(todo), desc="data build", unit="asset", enabled=progress) as bar):
        def record(rec: dict) -> None:
            manifest.write(json.dumps(rec, sort_keys=True) + "\n")
            manifest.flush()
            if rec["status"] == "ok":
                summary.built += 1
            else:
                summary.failed[rec["name"]] = rec["error"]
                log.warning("%s failed: %s", rec["name"], rec["error"])
            bar.update(1, failed=int(rec["status"] != "ok"))

        together = [a for a in todo if a.name not in apart]
        try:
            if workers <= 1:
                for a in together:
                    record(process_asset(a, config, str(out), tmp_tag))
                suspects = []
            else:
                suspects = _build_in_workers(together, str(out), config, tmp_tag, workers=workers,
                                                   record=record)
            _build_apart([a for a in todo if a.name in apart] + suspects, str(out), config, tmp_tag,
                         record=record)
        except (KeyboardInterrupt, SystemExit, OutputNotWritable):
            remove_stale_temps(out, tmp_tag)  # those of the workers stopped here: no process died of their assets
            log.warning("data build stopped after %d of %d assets; a re-run resumes", bar.done, bar.total)
            raise
    summary.seconds = time.perf_counter() - t0


def _build_in_workers(todo: list[AssetSource], out: str, config: BuildConfig, tmp_tag: str, *, workers: int,
                      record: Callable[[dict], None]) -> list[AssetSource]:
    """:func:`process_asset` on each of ``todo`` in ``workers`` processes; ``record`` each result as it comes.

    A worker killed while it builds (the OOM killer on a huge mesh) takes its pool down; the others go on in a new
    pool. Returns the assets in progress at such deaths, to build apart (:func:`_build_apart`)."""
    remaining, suspects = todo, []
    while remaining:
        unfinished, started = _run_pool(remaining, out, config, tmp_tag, workers=workers, record=record)
        if unfinished and not started:
            from concurrent.futures.process import BrokenProcessPool

            raise BrokenProcessPool("a worker process of the build died before it started an asset")
        suspects += started
        remaining = [a for a in unfinished if a not in started]
    return suspects


def _build_apart(assets: list[AssetSource], out: str, config: BuildConfig, tmp_tag: str, *,
                 record: Callable[[dict], None]) -> None:
    """Each of ``assets`` (a process died while building it) in a worker process of its own, one at a time: one
    whose worker dies again is recorded failed, and the build goes on."""
    for asset in assets:
        log.info("building %s in a process of its own (a process died while building it)", asset.name)
        t0 = time.perf_counter()
        if _run_pool([asset], out, config, tmp_tag, workers=1, record=record)[0]:
            record({**_new_record(asset), "status": "failed", "seconds": round(time.perf_counter() - t0, 4),
                    "error": "the worker process building it died, with no other asset in progress (killed by the "
                             "system: out of memory?)", "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _run_pool(assets: list[AssetSource], out: str, config: BuildConfig, tmp_tag: str, *, workers: int,
              record: Callable[[dict], None]) -> tuple[list[AssetSource], list[AssetSource]]:
    """One pool over ``assets``: ``record`` each result; the assets left unfinished when a worker died, and those
    of them that had started.

    Whatever ends it early (Ctrl-C, SIGTERM, an error) terminates and joins the workers: no process is left
    running and no semaphore is left to the resource tracker."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: forking a process that already runs torch/OpenMP threads can deadlock.
    context = mp.get_context("spawn")
    started = context.SimpleQueue()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(threads, os.getpid(), started))
    finished = set()
    try:
        # The workers start in the first submits and inherit SIGINT ignored: a Ctrl-C in the terminal reaches
        # every process of its group, and a worker interrupted there would print a traceback.
        with _signal_handler(signal.SIGINT, signal.SIG_IGN):
            futures = [pool.submit(_process_in_worker, a, config, out, tmp_tag) for a in assets[:workers]]
        futures += [pool.submit(_process_in_worker, a, config, out, tmp_tag) for a in assets[workers:]]
        for fut in as_completed(futures):
            try:
                rec = fut.result()
            except BrokenProcessPool:  # a worker died: every asset not finished by then ends so
                continue
            record(rec)
            finished.add(rec["name"])
    except BaseException:
        # The assets in progress stop too (the next run removes their temp files).
        for process in list(pool._processes.values()):  # no public handle before Python 3.14's terminate_workers()
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    names = set()
    while not started.empty():
        names.add(started.get())
    started.close()
    unfinished = [a for a in assets if a.name not in finished]
    return unfinished, [a for a in unfinished if a.name in names]


def load_asset(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of one asset file (see the module docstring for the keys)."""
    with open_asset(path) as z:
        return {k: z[k] for k in z.files}


def asset_images(arrays: dict[str, np.ndarray]) -> list[bytes]:
    """The PNG bytes of each view of an asset loaded by :func:`load_asset`."""
    data, offsets = arrays["render/png"].tobytes(), arrays["render/png_offsets"]
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
