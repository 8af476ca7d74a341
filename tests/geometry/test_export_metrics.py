import pytest
import trimesh

from d3s2.geometry.export import decimate, export_mesh
from d3s2.geometry.metrics import mesh_metrics


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply", "stl"])
def test_export_roundtrip(tmp_path, fmt):
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    path = export_mesh(mesh, tmp_path / "sub" / f"m.{fmt}")
    back = trimesh.load(path, force="mesh")
    assert len(back.faces) == len(mesh.faces)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"m.{fmt}"]  # no temp file left behind


def test_export_errors_and_decimation(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    with pytest.raises(ValueError, match="unsupported export format"):
        export_mesh(mesh, tmp_path / "m.fbx")
    small = decimate(mesh, 200)
    assert 150 <= len(small.faces) <= 200
    export_mesh(mesh, tmp_path / "d.ply", num_faces=300)
    assert len(trimesh.load(tmp_path / "d.ply").faces) <= 300


def test_metrics_identity_and_shift():
    mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    same = mesh_metrics(mesh, mesh, num_samples=20000, num_volume_points=20000)
    assert same["chamfer_l1"] < 1e-9 and same["fscore@0.005"] == 1.0 and same["volume_iou"] == 1.0
    assert same["normal_consistency"] > 0.99 and same["watertight"] == 1.0
    shifted = mesh.copy()
    shifted.apply_translation([0.1, 0, 0])
    m = mesh_metrics(shifted, mesh, num_samples=20000, num_volume_points=20000)
    assert m["volume_iou"] == pytest.approx(0.9 / 1.1, abs=0.02)
    assert m["fscore@0.005"] < m["fscore@0.01"] < same["fscore@0.01"]
    assert m["chamfer_l2"] < m["chamfer_l1"]
