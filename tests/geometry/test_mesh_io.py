import random

import numpy as np
import pytest
import trimesh

from d3s2.geometry.mesh_io import MeshError, load_mesh, normalize_mesh, validate_mesh


def _write(path, text):
    path.write_text(text)
    return path


def test_load_formats_and_scene(tmp_path):
    box = trimesh.creation.box(extents=(1, 2, 3))
    for fmt in ("obj", "ply", "stl", "off", "glb"):
        p = tmp_path / f"box.{fmt}"
        box.export(p)
        m = load_mesh(p)
        assert len(m.faces) == 12
        assert np.allclose(np.ptp(m.vertices, axis=0), [1, 2, 3], atol=1e-5)
    # A scene with a translated node is merged in world coordinates.
    scene = trimesh.Scene()
    scene.add_geometry(box, transform=trimesh.transformations.translation_matrix([10, 0, 0]))
    scene.add_geometry(box)
    p = tmp_path / "scene.glb"
    scene.export(p)
    m = load_mesh(p)
    assert len(m.faces) == 24 and m.vertices[:, 0].max() == pytest.approx(10.5, abs=1e-5)


@pytest.mark.parametrize("name,text,message", [
    ("empty.obj", "", "file is empty"),
    ("nan.obj", "v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN or inf"),
    ("inf.obj", "v 0 0 0\nv 1 0 0\nv inf 1 0\nf 1 2 3\n", "NaN or inf"),
    ("nofaces.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no faces"),
    ("degenerate.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\nf 1 1 2\n", "degenerate"),
    ("garbage.glb", "this is not a glb file", "unreadable"),
    ("mesh.xyz", "1 2 3", "unsupported mesh format"),
])
def test_bad_files_raise_clear_errors(tmp_path, name, text, message):
    p = _write(tmp_path / name, text)
    with pytest.raises(MeshError, match=message) as err:
        load_mesh(p)
    assert str(p) in str(err.value)


def test_pmd_loads_outward_facing(tmp_path):
    from d3s2.geometry.pmd import write_pmd

    box = trimesh.creation.box()  # PMD stores the triangles clockwise
    write_pmd(tmp_path / "t.pmd", box.vertices, box.faces[:, ::-1])
    mesh = load_mesh(tmp_path / "t.pmd")
    assert len(mesh.faces) == 12 and mesh.is_watertight and mesh.volume > 0


def test_an_obj_that_is_not_utf8_loads(tmp_path):
    # A Latin-1 comment (an exporter's name or a material with an accent) is common in real OBJ files.
    p = tmp_path / "latin1.obj"
    p.write_bytes("# café, exported by Modèle\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n".encode("latin-1"))
    assert len(load_mesh(p).faces) == 1


@pytest.mark.parametrize("suffix", [".obj", ".stl"])
def test_random_bytes_say_no_triangles_were_read(tmp_path, suffix):
    p = tmp_path / f"noise{suffix}"
    p.write_bytes(random.Random(0).randbytes(4000))
    with pytest.raises(MeshError, match=f"no triangles could be read \\(not a valid {suffix[1:].upper()} file"):
        load_mesh(p)


def test_missing_file_and_array_checks(tmp_path):
    with pytest.raises(MeshError, match="no such file"):
        load_mesh(tmp_path / "absent.obj")
    with pytest.raises(MeshError, match="empty"):
        validate_mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=int), name="arr")
    with pytest.raises(MeshError, match="out of range"):
        validate_mesh(np.eye(3), np.array([[0, 1, 5]]), name="arr")


@pytest.mark.parametrize("size", [1e-100, 1e200])
def test_tiny_and_enormous_coordinates_load_and_normalise(tmp_path, size):
    box = trimesh.creation.box()
    p = _write(tmp_path / "box.obj", "".join(f"v {x:.17g} {y:.17g} {z:.17g}\n" for x, y, z in box.vertices * size)
               + "".join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in box.faces))
    mesh, _ = normalize_mesh(load_mesh(p))
    assert len(mesh.faces) == 12 and np.abs(mesh.vertices).max() == pytest.approx(0.95)


def test_a_bounding_box_beyond_float64_is_named(tmp_path):
    p = _write(tmp_path / "wide.obj", "v -1e308 0 0\nv 1e308 0 0\nv 0 1e308 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match="coordinates span more than float64 holds"):
        load_mesh(p)


def test_normalize_roundtrip():
    m = trimesh.creation.box(extents=(2, 4, 8))
    m.apply_translation([5, -3, 1])
    n, tf = normalize_mesh(m, scale=0.95)
    assert np.abs(n.vertices).max() == pytest.approx(0.95)
    assert np.allclose(tf.inverse(n.vertices), m.vertices)
