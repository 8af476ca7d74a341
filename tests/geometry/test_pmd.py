"""PMD importer: round trip through a PMD written from arrays, other versions, and clear errors."""

from __future__ import annotations

import struct
import zipfile

import numpy as np
import pytest

from d3s2.geometry.pmd import PMDError, parse_pmd, pmd_zip_to_npz, read_pmd, write_pmd


def _tetra():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) + np.float32(0.25)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    return v, f


@pytest.mark.parametrize("num_uv_sets", [1, 3])
def test_round_trip(tmp_path, num_uv_sets):
    v, f = _tetra()
    uvs = np.random.rand(4, num_uv_sets, 2).astype(np.float32)
    write_pmd(tmp_path / "t.pmd", v, f, normals=np.random.rand(4, 3), uvs=uvs)
    v2, f2 = read_pmd(tmp_path / "t.pmd")
    assert v2.dtype == np.float32 and f2.dtype == np.int64
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(f2, f)
    data = (tmp_path / "t.pmd").read_bytes()
    # The size field counts the bytes after it, so the game's reader accepts the file.
    assert struct.unpack_from("<I", data, 8)[0] == len(data) - 12


def test_version3_layout_has_one_uv_set():
    v, f = _tetra()
    rec = b"".join(struct.pack("<3f3f2f4B4f", *p, 0, 0, 1, 0.5, 0.5, 255, 255, 255, 255, 0, 0, 0, 0) for p in v)
    body = struct.pack("<I", 4) + rec + struct.pack("<I", 4) + f.astype("<u2").tobytes() + struct.pack("<I", 0)
    data = b"PSMD" + struct.pack("<II", 3, len(body)) + body
    v2, f2 = parse_pmd(data)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(f2, f)


def test_load_pmd_gives_trimesh(tmp_path):
    from d3s2.geometry.pmd import load_pmd

    v, f = _tetra()
    write_pmd(tmp_path / "t.pmd", v, f)
    mesh = load_pmd(tmp_path / "t.pmd")
    assert len(mesh.faces) == 4 and mesh.is_watertight


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"XXXX" + d[4:], "not a PMD file"),
    (lambda d: d[:4] + struct.pack("<I", 9) + d[8:], "unsupported PMD version 9"),
    (lambda d: d[:60], "truncated"),
    (lambda d: d[:-8 - 6], "truncated"),
])
def test_bad_files_name_the_problem(tmp_path, mutate, message):
    v, f = _tetra()
    write_pmd(tmp_path / "t.pmd", v, f)
    bad = tmp_path / "bad.pmd"
    bad.write_bytes(mutate((tmp_path / "t.pmd").read_bytes()))
    with pytest.raises(PMDError, match=message) as info:
        read_pmd(bad)
    assert "bad.pmd" in str(info.value)


def test_index_out_of_range(tmp_path):
    v, f = _tetra()
    write_pmd(tmp_path / "t.pmd", v, f)
    data = bytearray((tmp_path / "t.pmd").read_bytes())
    struct.pack_into("<H", data, len(data) - 8 - 2, 7)  # last index of the last face
    with pytest.raises(PMDError, match="face index 7 out of range"):
        parse_pmd(bytes(data), "x.pmd")


def test_missing_file(tmp_path):
    with pytest.raises(PMDError, match="cannot read"):
        read_pmd(tmp_path / "nope.pmd")


def test_zip_to_corpus_npz(tmp_path):
    v, f = _tetra()
    write_pmd(tmp_path / "a.pmd", v, f)
    write_pmd(tmp_path / "b.pmd", v * 2, f[:2])
    with zipfile.ZipFile(tmp_path / "public.zip", "w") as zf:
        zf.write(tmp_path / "a.pmd", "art/meshes/gaia/a.dae.cached.pmd")
        zf.write(tmp_path / "b.pmd", "art/meshes/props/b.dae.cached.pmd")
        zf.writestr("art/textures/x.png", b"not a mesh")
    assert pmd_zip_to_npz(tmp_path / "public.zip", tmp_path / "c.npz") == 2
    z = np.load(tmp_path / "c.npz")
    assert sorted(z.files) == ["art|meshes|gaia|a.dae.cached.pmd|f", "art|meshes|gaia|a.dae.cached.pmd|v",
                               "art|meshes|props|b.dae.cached.pmd|f", "art|meshes|props|b.dae.cached.pmd|v"]
    assert z["art|meshes|props|b.dae.cached.pmd|f"].dtype == np.uint16
    np.testing.assert_array_equal(z["art|meshes|props|b.dae.cached.pmd|v"], v * 2)
