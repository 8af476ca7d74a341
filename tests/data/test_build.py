"""`d3s2 data build` on the tiny 0 A.D. fixture: files + manifest, resume, failures, shards, atomicity."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh

import d3s2
from d3s2.cli import main
from d3s2.data import build as build_mod
from d3s2.data.build import (
    AssetSource,
    BuildConfig,
    asset_images,
    asset_path,
    build,
    load_asset,
    manifest_path,
    parse_shard,
    read_manifest,
    remove_stale_temps,
    resolve_sources,
    select,
)
from d3s2.geometry.render import decode_png

TINY = Path(__file__).resolve().parents[1] / "assets" / "0ad_tiny.npz"
# A band of 2 voxels at 32³ (the default 1/128 is a quarter voxel there and may hold no voxel centre).
ARGS = ["--resolutions", "32", "--band", "0.0625", "--views", "2", "--image-size", "32", "--no-progress"]
CONFIG = BuildConfig(resolutions=(32,), views=2, image_size=32, band=0.0625)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    assert main(["data", "build", "0ad", "--corpus", str(TINY), "--out", str(out), *ARGS]) == 0
    return out


def test_writes_one_file_per_asset_and_a_manifest(built):
    records = read_manifest(built)
    assert sorted(records) == [f"0ad/{n}" for n in ["gaia/bamboo_1", "props/ashoka_lion",
                                                    "props/brit_workshop_ram_wheels", "skeletal/animal_boar",
                                                    "structural/celt_house_a"]]
    for name, rec in records.items():
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["triangles"] > 100 and rec["voxels"]["32"] > 0 and rec["blocks"]["32"] > 0
        assert isinstance(rec["watertight"], bool) and rec["seconds"] > 0
        arrays = load_asset(asset_path(built, name))
        assert str(arrays["name"]) == name
        assert len(arrays["sdf32/sdf"]) == rec["voxels"]["32"]
        assert arrays["sdf32/coords"].min() >= 0 and arrays["sdf32/coords"].max() < 32
        images = [decode_png(p) for p in asset_images(arrays)]
        assert len(images) == 2 and images[0].shape == (32, 32, 4) and images[0][..., 3].max() == 255
        assert arrays["render/intrinsics"].shape == (2, 3, 3) and arrays["render/world_to_camera"].shape == (2, 4, 4)
    assert json.loads((built / "build.json").read_text())["resolutions"] == [32]
    assert not list(built.rglob("*.tmp*"))


def test_rerun_skips_finished_assets(built):
    files = sorted(built.rglob("*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    summary = build(resolve_sources(["0ad"], corpus_path=str(TINY)), built, CONFIG, progress=False)
    assert (summary.skipped, summary.built, summary.failed) == (5, 0, {})
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_other_settings_are_refused(built):
    with pytest.raises(ValueError, match="views"):
        build([], built, BuildConfig(resolutions=(32,), views=3, image_size=32, band=0.0625), progress=False)


def test_settings_bind_only_once_an_asset_is_written(tmp_path, monkeypatch, caplog):
    src = tmp_path / "meshes"
    src.mkdir()
    (src / "empty.obj").write_text("")
    out = tmp_path / "out"
    other = BuildConfig(resolutions=(16,), views=0, band=0.25)
    assert list(build(resolve_sources([str(src)]), out, CONFIG, progress=False).failed) == ["meshes/empty.obj"]
    # Every asset failed: nothing holds the first settings, other ones replace them.
    with caplog.at_level(logging.INFO):
        build(resolve_sources([str(src)]), out, other, progress=False)
    assert json.loads((out / "build.json").read_text())["resolutions"] == [16]
    assert any("holds no asset yet" in r.getMessage() and "resolutions" in r.getMessage() for r in caplog.records)

    def interrupted(*args):
        raise KeyboardInterrupt

    trimesh.creation.box().export(src / "box.obj")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):  # Ctrl-C before the first asset
        patch.setattr(build_mod, "process_asset", interrupted)
        build(resolve_sources([str(src)]), out, CONFIG, progress=False)
    assert json.loads((out / "build.json").read_text())["resolutions"] == [32]
    assert build(resolve_sources([str(src)]), out, other, progress=False).built == 1
    with pytest.raises(ValueError, match="built with other settings"):  # an asset holds them now
        build(resolve_sources([str(src)]), out, CONFIG, progress=False)
    assert json.loads((out / "build.json").read_text())["resolutions"] == [16]


def _two_shards(tmp_path):
    """Two one-mesh sources in one corpus folder, as two shards would build them."""
    src = tmp_path / "meshes"
    src.mkdir()
    trimesh.creation.box().export(src / "box.obj")
    trimesh.creation.icosphere(1).export(src / "ball.obj")
    box, ball = sorted(resolve_sources([str(src)]), key=lambda a: a.name != "meshes/box.obj")
    return [box], [ball]


def _resolutions_built(out):
    keys = {k for f in (out / "assets").rglob("*.npz") for k in load_asset(f)}
    return sorted({k.split("/")[0] for k in keys if k.startswith("sdf")})


def test_a_shard_with_other_settings_is_refused_while_one_runs(tmp_path, monkeypatch):
    # Shards started together: the second one checks while the first builds its first asset (no asset written yet).
    mine, theirs = _two_shards(tmp_path)
    out, other = tmp_path / "out", BuildConfig(resolutions=(16,), views=0, band=0.25)
    build_asset, outcomes = build_mod.build_asset, []

    def build_asset_while_other_shards_start(asset, config):
        if asset.name == mine[0].name:
            for settings in (other, CONFIG):
                try:
                    outcomes.append(build(theirs, out, settings, shard=(1, 2), progress=False).built)
                except ValueError as err:
                    outcomes.append(str(err))
        return build_asset(asset, config)

    monkeypatch.setattr(build_mod, "build_asset", build_asset_while_other_shards_start)
    assert build(mine, out, CONFIG, shard=(0, 2), progress=False).built == 1
    refused, same_settings_built = outcomes
    assert "another build with other settings is running" in str(refused)
    assert "'resolutions': ([32], [16])" in refused and "'views': (2, 0)" in refused  # theirs and yours
    assert same_settings_built == 1
    assert json.loads((out / "build.json").read_text())["resolutions"] == [32]
    assert _resolutions_built(out) == ["sdf32"]
    # Once it ended with no asset, other settings could replace them; with assets they are refused for good.
    with pytest.raises(ValueError, match="built with other settings"):
        build(theirs, out, other, progress=False)


def test_shards_racing_on_build_json_bind_one_setting(tmp_path, monkeypatch):
    # The second shard checks between the first one's check and its write of build.json.
    mine, theirs = _two_shards(tmp_path)
    out, other = tmp_path / "out", BuildConfig(resolutions=(16,), views=0, band=0.25)
    write_text, errors = build_mod.atomic_write_text, []

    def other_shard():
        try:
            build(theirs, out, other, shard=(1, 2), progress=False)
        except ValueError as err:
            errors.append(err)

    def write_while_the_other_shard_starts(path, text):
        if not hasattr(write_while_the_other_shard_starts, "started"):
            write_while_the_other_shard_starts.started = threading.Thread(target=other_shard)
            write_while_the_other_shard_starts.started.start()
            write_while_the_other_shard_starts.started.join(timeout=0.5)  # time for it to pass an unlocked check
        return write_text(path, text)

    monkeypatch.setattr(build_mod, "atomic_write_text", write_while_the_other_shard_starts)
    assert build(mine, out, CONFIG, shard=(0, 2), progress=False).built == 1
    write_while_the_other_shard_starts.started.join()
    assert len(errors) == 1 and "other settings" in str(errors[0]) and "'resolutions': ([32], [16])" in str(errors[0])
    assert _resolutions_built(out) == ["sdf32"]


def test_a_file_system_without_locks_builds_without_the_shard_check(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    mine, _ = _two_shards(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        assert build(mine, tmp_path / "out", CONFIG, progress=False).built == 1
    assert any("no file locks" in r.getMessage() for r in caplog.records)


def test_a_platform_without_fcntl_builds_without_the_shard_check(tmp_path, monkeypatch, caplog):
    from d3s2.data import build as build_module

    mine, _ = _two_shards(tmp_path)
    monkeypatch.setattr(build_module, "fcntl", None)  # as where `import fcntl` fails (Windows)
    with caplog.at_level(logging.WARNING):
        assert build(mine, tmp_path / "out", CONFIG, progress=False).built == 1
    assert any("no fcntl" in r.getMessage() for r in caplog.records)


def test_deterministic(built, tmp_path):
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=2)
    build(sources, tmp_path, CONFIG, progress=False)
    for a in sources:
        first, again = load_asset(asset_path(built, a.name)), load_asset(asset_path(tmp_path, a.name))
        assert first.keys() == again.keys()
        for k in first:
            np.testing.assert_array_equal(first[k], again[k], err_msg=k)


def test_bad_meshes_are_recorded_and_the_rest_goes_on(tmp_path):
    src = tmp_path / "meshes"
    (src / "sub").mkdir(parents=True)
    trimesh.creation.box().export(src / "sub" / "good.obj")
    (src / "garbage.ply").write_bytes(b"ply\nformat nonsense\n\x00\x01")
    (src / "empty.obj").write_text("")
    (src / "bad.pmd").write_bytes(b"NOPE" + bytes(40))
    (src / "notes.txt").write_text("not a mesh")
    out = tmp_path / "out"
    summary = build(resolve_sources([str(src)]), out, CONFIG, progress=False)
    assert summary.built == 1 and set(summary.failed) == {"meshes/garbage.ply", "meshes/empty.obj", "meshes/bad.pmd"}
    assert asset_path(out, "meshes/sub/good.obj").exists()
    for name, reason in summary.failed.items():
        assert name.rsplit("/", 1)[1] in reason  # the reason names the file
    assert "not a PMD file" in summary.failed["meshes/bad.pmd"]
    records = read_manifest(out)
    assert {n: r["status"] for n, r in records.items()} == {"meshes/sub/good.obj": "ok", "meshes/garbage.ply": "failed",
                                                            "meshes/empty.obj": "failed", "meshes/bad.pmd": "failed"}
    # A re-run retries only the failed ones, once fixed they build.
    trimesh.creation.icosphere(2).export(src / "empty.obj")
    again = build(resolve_sources([str(src)]), out, CONFIG, progress=False)
    assert (again.skipped, again.built, set(again.failed)) == (1, 1, {"meshes/garbage.ply", "meshes/bad.pmd"})
    assert read_manifest(out)["meshes/empty.obj"]["status"] == "ok"


def test_shards_partition_the_assets(tmp_path):
    names = [AssetSource(f"x/{i}", "p") for i in range(200)]
    parts = [select(names, shard=(i, 3)) for i in range(3)]
    assert sorted(a for p in parts for a in p) == sorted(names)
    assert all(len(p) > 40 for p in parts)
    sub = select(names, subset=50, seed=1)
    assert len(sub) == 50 and sub == select(names, subset=50, seed=1) != select(names, subset=50, seed=2)
    assert sorted(a for i in range(2) for a in select(names, shard=(i, 2), subset=50, seed=1)) == sub
    # Two shards write into one folder, each with its own manifest; together they are the whole corpus.
    sources = resolve_sources(["0ad:props", "0ad:gaia"], corpus_path=str(TINY))
    for i in range(2):
        build(select(sources, shard=(i, 2)), tmp_path, CONFIG, shard=(i, 2), progress=False)
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.0-of-2.jsonl", "manifest.1-of-2.jsonl"]
    assert sorted(read_manifest(tmp_path)) == sorted(a.name for a in sources)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("2/2")


def ended_pid() -> int:
    """The pid of a process that has ended (as a killed run's writer)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_temp_files_of_ended_writers_go_those_of_running_ones_stay(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writing:  # another build
        try:
            names = [f"a.npz.tmp-s0of1-{ended_pid()}", f"b.npz.tmp-s0of1-{writing.pid}", "c.npz.tmp-s1of2-1"]
            for name in names:
                (assets / name).write_bytes(b"partial")
            remove_stale_temps(tmp_path, "-s0of1")
            assert sorted(p.name for p in assets.iterdir()) == names[1:]  # and other shards' temps stay too
        finally:
            writing.kill()


def test_asset_files_are_synced_before_they_take_their_name(tmp_path, monkeypatch):
    # Else a power loss can leave an empty file under the final name, which a re-run takes for a finished asset.
    synced = []
    monkeypatch.setattr(build_mod.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino))
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=1)
    assert build(sources, tmp_path, CONFIG, progress=False).built == 1
    assert asset_path(tmp_path, sources[0].name).stat().st_ino in synced


def test_no_partial_file_on_failure(tmp_path, monkeypatch):
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=1)
    stale = asset_path(tmp_path, "0ad/gaia/old").with_name(f"old.npz.tmp-s0of1-{ended_pid()}")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")

    def savez_then_die(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(build_mod.np, "savez_compressed", savez_then_die)
    summary = build(sources, tmp_path, CONFIG, progress=False)
    assert list(summary.failed.values()) == ["OSError: disk full"]
    assert not list((tmp_path / "assets").rglob("*.npz")) and not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_or_read_only_output_stops_the_build_at_the_first_write(tmp_path, monkeypatch, workers):
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=2)
    attempts = tmp_path / "attempts"  # one line per write tried, from any process

    def disk_full(fh, **arrays):
        with open(attempts, "a") as f:
            f.write("write\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if workers > 1:  # spawned workers import the module afresh: patch there through an import hook
        monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        (tmp_path / "sitecustomize.py").write_text(
            "import errno, os, numpy\n"
            "def disk_full(fh, **arrays):\n"
            f"    open({str(attempts)!r}, 'a').write('write\\n')\n"
            "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "numpy.savez_compressed = disk_full\n")
    else:
        monkeypatch.setattr(build_mod.np, "savez_compressed", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"cannot write .*\.npz: No space left on device; the build stops"):
        build(sources, out, CONFIG, workers=workers, progress=False)
    assert attempts.read_text().count("write") <= workers  # not one failed write per asset
    assert not list(out.rglob("*.npz")) and not list(out.rglob("*.tmp*")) and read_manifest(out) == {}


def test_an_output_without_room_for_an_assets_temp_file_stops_the_build_too(tmp_path, monkeypatch):
    # The temp file is made when the asset starts (it marks the asset in progress), before any array is written.
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=2)

    def no_inode_left(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(build_mod.Path, "touch", no_inode_left)
    with pytest.raises(build_mod.OutputNotWritable, match=r"cannot write .*\.npz: No space left on device"):
        build(sources, tmp_path / "out", CONFIG, progress=False)
    assert read_manifest(tmp_path / "out") == {}


def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    trimesh.creation.box().export(tmp_path / "box.obj")
    assert main(["data", "build", str(tmp_path / "box.obj"), "--out", str(tmp_path / "box.obj"), *ARGS]) == 1
    assert "box.obj: expected an output folder (or a path to create one at), found a file" in capsys.readouterr().err


def test_process_pool(tmp_path, built):
    # One asset: spawned workers start on demand, and each start imports torch (seconds on a busy CI box).
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=1)
    summary = build(sources, tmp_path, CONFIG, workers=2, progress=False)
    assert summary.built == 1 and read_manifest(tmp_path)[sources[0].name]["status"] == "ok"
    a, b = load_asset(asset_path(tmp_path, sources[0].name)), load_asset(asset_path(built, sources[0].name))
    np.testing.assert_array_equal(a["sdf32/coords"], b["sdf32/coords"])
    np.testing.assert_array_equal(a["render/png"], b["render/png"])


def test_sources_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no mesh"):
        resolve_sources([str(tmp_path / "*.obj")])
    trimesh.creation.box().export(tmp_path / "a.obj")
    assert [a.name for a in resolve_sources([str(tmp_path / "*.obj")])] == [f"{tmp_path.name}/a.obj"]
    with pytest.raises(ValueError, match="multiples of 8"):
        BuildConfig(resolutions=(30,))


@pytest.mark.parametrize("setting", [{"scale": 1.5}, {"scale": 0}, {"resolutions": (4096,)}])
def test_settings_every_asset_would_fail_on_are_refused_up_front(setting):
    with pytest.raises(ValueError, match=f"expected .*{next(iter(setting))}"):
        BuildConfig(**setting)


def test_a_negative_subset_is_refused():
    sources = resolve_sources(["0ad"], corpus_path=str(TINY))
    with pytest.raises(ValueError, match="subset of K >= 0"):
        select(sources, subset=-1)  # a slice [:-1] dropped one asset


def test_linked_mesh_files_keep_the_names_of_their_links(tmp_path):
    # As in a Hugging Face, git-annex or DVC cache: each mesh a link to an extensionless blob outside the folder.
    blobs, src = tmp_path / "blobs", tmp_path / "meshes"
    blobs.mkdir()
    src.mkdir()
    trimesh.creation.box().export(blobs / "4f2a9c", file_type="obj")
    (src / "box.obj").symlink_to(blobs / "4f2a9c")
    link = os.path.abspath(src / "box.obj")
    for source in (src, src / "*.obj", src / "box.obj"):
        assert [(a.name, a.path) for a in resolve_sources([str(source)])] == [("meshes/box.obj", link)]
    assert build(resolve_sources([str(src)]), tmp_path / "out", CONFIG, progress=False).built == 1


def test_a_folder_source_reaches_meshes_in_linked_subfolders(tmp_path):
    store, src = tmp_path / "store", tmp_path / "meshes"
    (store / "chairs").mkdir(parents=True)
    src.mkdir()
    trimesh.creation.box().export(store / "chairs" / "chair.obj")
    trimesh.creation.icosphere(1).export(src / "ball.obj")
    (src / "chairs").symlink_to(store / "chairs")
    (store / "chairs" / "back").symlink_to(src)  # a cycle: each real folder is read once
    assert [a.name for a in resolve_sources([str(src)])] == ["meshes/ball.obj", "meshes/chairs/chair.obj"]


def test_a_folder_names_the_files_it_skips(tmp_path, caplog):
    trimesh.creation.box().export(tmp_path / "box.obj")
    for name in ("chair.fbx", "table.fbx", "notes.txt", "box.mtl", "wood.png", "README"):
        (tmp_path / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="d3s2.data.build"):
        assert [a.name for a in resolve_sources([str(tmp_path)])] == [f"{tmp_path.name}/box.obj"]
    # materials and textures come with meshes: not named
    assert "4 files skipped, not a mesh format d3s2 reads (.fbx x2, .txt x1, no extension x1)" in caplog.text
    caplog.clear()
    resolve_sources([str(tmp_path / "box.obj"), str(tmp_path / "*.obj")])
    assert not caplog.text  # a named file or a glob of mesh files skips nothing


def test_cli_exits_1_when_an_asset_fails(tmp_path, capsys):
    src = tmp_path / "meshes"
    src.mkdir()
    trimesh.creation.box().export(src / "good.obj")
    (src / "empty.obj").write_text("")
    out = tmp_path / "out"
    assert main(["data", "build", str(src), "--out", str(out), *ARGS]) == 1
    printed = capsys.readouterr().out
    assert "built 1, skipped 0 (already done), failed 1" in printed and "FAILED meshes/empty.obj" in printed
    # A re-run that builds nothing new still reports the asset that fails again.
    assert main(["data", "build", str(src), "--out", str(out), *ARGS]) == 1
    (src / "empty.obj").unlink()
    assert main(["data", "build", str(src), "--out", str(out), *ARGS]) == 0


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys, caplog):
    with_progress = [a for a in ARGS if a != "--no-progress"]
    with caplog.at_level(logging.INFO):  # pytest's stderr is not a terminal, as a redirected log
        assert main(["data", "build", "0ad", "--corpus", str(TINY), "--subset", "2", "--out", str(tmp_path),
                     *with_progress]) == 0
    assert "\r" not in capsys.readouterr().err  # no bar frames
    lines = [r.getMessage() for r in caplog.records if r.name == "d3s2.progress"]
    assert len(lines) == 1 and re.fullmatch(r"data build: 2/2 assets, [0-9.e+-]+ assets/s", lines[0]), lines


def test_narrow_band_is_warned_once_per_resolution(tmp_path, caplog):
    src = tmp_path / "meshes"
    src.mkdir()
    for i in range(3):
        trimesh.creation.box(extents=(1, 1 + i / 4, 1)).export(src / f"box{i}.obj")
    # 0.2 is narrower than a voxel at 8³ (0.25) but not at 16³ (0.125).
    config = BuildConfig(resolutions=(8, 16), views=0, band=0.2)
    with caplog.at_level("WARNING"):
        summary = build(resolve_sources([str(src)]), tmp_path / "out", config, progress=False)
    assert summary.built == 3
    warned = [r.getMessage() for r in caplog.records if "narrower than one voxel" in r.getMessage()]
    assert len(warned) == 1 and "at 8^3" in warned[0], warned


def test_a_closed_stl_or_far_off_mesh_is_recorded_watertight(tmp_path):
    src = tmp_path / "meshes"
    src.mkdir()
    trimesh.creation.box().export(src / "box.stl")  # STL stores every triangle's own corners: nothing is shared
    box = trimesh.creation.box()
    trimesh.Trimesh(box.vertices, box.faces[:-2]).export(src / "open.stl")  # one side removed
    # Survey units: at 1e12 trimesh's absolute merge tolerance (1e-8) overflows int64 and merges every corner.
    trimesh.Trimesh(box.vertices * 1e12 + 3e12, box.faces, process=False).export(src / "far.ply")
    build(resolve_sources([str(src)]), tmp_path / "out", CONFIG, progress=False)
    records = read_manifest(tmp_path / "out")
    assert records["meshes/box.stl"]["watertight"] is True
    assert records["meshes/far.ply"]["watertight"] is True
    assert records["meshes/open.stl"]["watertight"] is False


def test_the_workers_of_a_killed_build_end(tmp_path):
    """SIGKILL to the main process (the OOM killer, kill -9) runs no cleanup: its workers end by themselves."""
    command, env = _box_build(tmp_path, 100, spread=128)  # far more boxes than get done before the kill
    out = tmp_path / "out"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (manifest_path(out).exists() and manifest_path(out).read_text()):  # a worker has run an asset
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.kill()
        proc.communicate(timeout=15)  # ends once no process holds stderr: the workers are gone too
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers a failed run left behind
        except ProcessLookupError:
            pass
    assert len(read_manifest(out)) < 100  # killed amid its work (the other signal tests check resuming)


_KILLING_HOOK = """
import os
import signal

import d3s2.data.build

build_asset = d3s2.data.build.build_asset


def killed_on_big(asset, config):
    if asset.name.endswith("/big.obj"):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a worker that runs out of memory
    return build_asset(asset, config)


d3s2.data.build.build_asset = killed_on_big
"""


def test_an_asset_that_kills_its_worker_fails_alone(tmp_path):
    """The pool a killed worker takes down goes on without it: the assets then in progress are retried one at a time,
    and the one whose worker dies alone is recorded failed."""
    command, env = _box_build(tmp_path, 8, hook=_KILLING_HOOK)
    _assert_only_big_failed(subprocess.run(command, capture_output=True, text=True, env=env, timeout=120),
                            tmp_path / "out", boxes=8)


def _assert_only_big_failed(run: subprocess.CompletedProcess, out: Path, *, boxes: int) -> None:
    assert run.returncode == 1, run.stderr
    assert f"built {boxes}, skipped 0 (already done), failed 1" in run.stdout, run.stdout + run.stderr
    assert "FAILED meshes/big.obj: the worker process building it died" in run.stdout
    records = read_manifest(out)
    assert sorted(n for n, r in records.items() if r["status"] == "ok") == [f"meshes/box{i}.obj" for i in range(boxes)]


def _box_build(tmp_path: Path, boxes: int, *, spread: int = 8, workers: int = 2,
               hook: str | None = None) -> tuple[list[str], dict[str, str]]:
    """``d3s2 data build`` (command, environment) of ``boxes`` boxes of other heights into ``tmp_path/out``; with
    ``hook`` (a sitecustomize.py, run in every process: the spawned workers too) also of big.obj."""
    src = tmp_path / "meshes"
    src.mkdir()
    for i in range(boxes):
        trimesh.creation.box(extents=(1, 1 + i / spread, 1)).export(src / f"box{i}.obj")
    paths = [str(Path(d3s2.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    if hook is not None:
        trimesh.creation.box().export(src / "big.obj")
        (tmp_path / "hook").mkdir()
        (tmp_path / "hook" / "sitecustomize.py").write_text(hook)
        paths.insert(0, str(tmp_path / "hook"))
    command = [sys.executable, "-m", "d3s2.cli", "data", "build", str(src), "--out", str(tmp_path / "out"),
               "--workers", str(workers), "--resolutions", "16", "--views", "0", "--band", "0.25", "--no-progress"]
    return command, {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_an_asset_that_killed_a_one_process_build_is_built_alone_by_the_rerun(tmp_path):
    """With --workers 1 the build itself dies with the asset (the OOM killer); its temp file tells the re-run which
    asset that was: built last in a process of its own, and recorded failed when that dies too."""
    command, env = _box_build(tmp_path, 3, workers=1, hook=_KILLING_HOOK)
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == -signal.SIGKILL  # died at big.obj, the first asset in name order
    _assert_only_big_failed(subprocess.run(command, capture_output=True, text=True, env=env, timeout=120),
                            tmp_path / "out", boxes=3)


def test_an_asset_stopped_by_ctrl_c_leaves_no_temp_file_to_build_it_apart(tmp_path, monkeypatch):
    sources = select(resolve_sources(["0ad"], corpus_path=str(TINY)), subset=1)

    def interrupted(asset, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "build_asset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(sources, tmp_path, CONFIG, progress=False)
    assert not list(tmp_path.rglob("*.tmp*"))  # a re-run builds it with the others


def test_a_signal_ignored_from_the_start_stays_ignored():
    # A parent that ignores SIGTERM (as a shell ignores SIGINT in a command it starts with `&` from a script) means
    # the build to go on through it: the build's own handler would end it with 143.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with build_mod._signal_handler(signal.SIGTERM, build_mod._exit_on_sigterm):
            os.kill(os.getpid(), signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("signum", "whole_group", "code"), [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
                         ids=["SIGTERM-to-main", "SIGINT-to-group"])
def test_a_signal_stops_the_workers_cleanly(tmp_path, signum, whole_group, code):
    """SIGTERM to the main process alone (`kill PID`: it stops the workers itself), SIGINT to every process of the
    group (Ctrl-C in a terminal): the exit code of the signal, no traceback, no leaked semaphore, and it resumes."""
    command, env = _box_build(tmp_path, 6)
    out = tmp_path / "out"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not manifest_path(out).exists():  # opened right before the worker pool starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(0.2)  # the pool's queues exist and its workers are starting (importing torch takes longer)
        (os.killpg if whole_group else os.kill)(proc.pid, signum)
        _, err = proc.communicate(timeout=30)  # ends once no process holds stderr: the workers are gone too
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed run left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == code, err
    assert "Traceback" not in err and "leaked" not in err and "resource_tracker" not in err, err
    assert "a re-run resumes" in err
    summary = build(resolve_sources([str(tmp_path / "meshes")]), out,
                    BuildConfig(resolutions=(16,), views=0, band=0.25), progress=False)
    assert summary.skipped + summary.built == 6 and not summary.failed
    assert not list(out.rglob("*.tmp*"))
