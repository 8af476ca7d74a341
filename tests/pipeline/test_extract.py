import numpy as np
import pytest
import torch

from d3s2.pipeline.extract import closed_mesh, drop_small_components, empty_block_signs, vertex_components


def _blocks_field(fn, resolution: int, keep_block):
    g = resolution // 8
    blocks = torch.stack(torch.meshgrid(*[torch.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)
    blocks = blocks[keep_block(blocks)]
    off = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = (blocks[:, None] * 8 + off[None]).reshape(-1, 3)
    p = (coords.float() + 0.5) * 2 / resolution - 1
    return coords, fn(p), blocks


def test_hollow_band_gives_one_surface_without_inner_shell():
    r, radius = 64, 0.6
    centre = lambda b: ((b.float() * 8 + 4) + 0.5) * 2 / r - 1  # noqa: E731
    # Only blocks near the sphere are "occupied": the interior blocks are empty, as in a generated band.
    coords, values, blocks = _blocks_field(lambda p: p.norm(dim=1) - radius, r,
                                           lambda b: (centre(b).norm(dim=1) - radius).abs() < 0.25)
    signs = empty_block_signs(blocks, r // 8)
    assert (signs == -1).any() and (signs == 1).any()  # an enclosed interior exists and is inside
    mesh = closed_mesh(coords, values, blocks, r)
    assert mesh.is_watertight and mesh.is_winding_consistent
    parts = mesh.split(only_watertight=False)
    assert len(parts) == 1  # no inner shell
    assert abs(mesh.volume - 4 / 3 * np.pi * radius**3) / (4 / 3 * np.pi * radius**3) < 0.03


def test_noise_field_is_watertight_and_small_parts_drop():
    torch.manual_seed(0)
    coords, values, blocks = _blocks_field(lambda p: torch.randn(len(p)) * 0.5 + 0.3, 40,
                                           lambda b: torch.rand(len(b)) < 0.4)
    mesh = closed_mesh(coords, values, blocks, 40)
    assert len(mesh.faces) > 0 and mesh.is_watertight and mesh.is_winding_consistent
    cleaned = drop_small_components(mesh, 0.5)
    assert 0 < len(cleaned.faces) < len(mesh.faces) and cleaned.is_watertight


def test_outside_fraction_decides_enclosed_regions_only():
    """The sign refiner's vote: an enclosed region predicted outside becomes +1 (the interior wall then has no
    surface, a hollow shell gets two closed surfaces); the border region stays +1 whatever the vote."""
    r, radius = 64, 0.6
    g = r // 8
    centre = lambda b: ((b.float() * 8 + 4) + 0.5) * 2 / r - 1  # noqa: E731
    coords, _, blocks = _blocks_field(lambda p: p.norm(dim=1) - radius, r,
                                      lambda b: (centre(b).norm(dim=1) - radius).abs() < 0.25)
    values = torch.full((len(coords),), -0.5)  # the band itself is inside: surfaces only where empty space is +1
    plain = empty_block_signs(blocks, g)
    all_out = empty_block_signs(blocks, g, torch.ones(g, g, g))
    all_in = empty_block_signs(blocks, g, torch.zeros(g, g, g))
    np.testing.assert_array_equal(all_in, plain)
    assert (all_out >= 0).all() and (all_out[plain == -1] == 1).all()
    one = closed_mesh(coords, values, blocks, r, outside_fraction=torch.zeros(g, g, g))
    two = closed_mesh(coords, values, blocks, r, outside_fraction=torch.ones(g, g, g))
    assert one.is_watertight and two.is_watertight
    assert len(one.split(only_watertight=False)) == 1 and len(two.split(only_watertight=False)) == 2


def test_drop_small_components_keeps_vertex_order_and_drops_unreferenced():
    import trimesh

    big = trimesh.creation.icosphere(subdivisions=2)
    small = trimesh.creation.icosahedron()
    small.vertices = small.vertices * 0.1 + 3
    # vertex layout: small part, one unreferenced vertex, big part
    verts = np.concatenate([small.vertices, [[9.0, 9.0, 9.0]], big.vertices])
    faces = np.concatenate([small.faces, big.faces + len(small.vertices) + 1])
    mesh = trimesh.Trimesh(verts, faces, process=False)
    cleaned = drop_small_components(mesh, 0.5)
    np.testing.assert_array_equal(cleaned.vertices, big.vertices)
    np.testing.assert_array_equal(cleaned.faces, big.faces)
    kept = drop_small_components(mesh, 0.01)  # nothing dropped, the unreferenced vertex still goes
    assert len(kept.faces) == len(faces) and len(kept.vertices) == len(verts) - 1
    assert drop_small_components(big, 0.01) is big  # nothing to remove: no copy


def _partition(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def test_vertex_components_match_scipy_and_are_component_minima():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    nv = 300
    faces = rng.integers(0, nv, size=(120, 3))  # many small components, some isolated vertices
    path = np.stack([np.arange(200, 297), np.arange(201, 298), np.arange(202, 299)], 1)[::-1]  # a long strip
    faces = np.concatenate([faces % 200, path])
    label = vertex_components(torch.from_numpy(faces), nv).numpy()
    rows, cols = np.concatenate([faces[:, 0], faces[:, 1]]), np.concatenate([faces[:, 1], faces[:, 2]])
    _, ref = connected_components(coo_matrix((np.ones(rows.size), (rows, cols)), shape=(nv, nv)), directed=False)
    assert _partition(label) == _partition(ref)
    assert all(label[min(g)] == min(g) for g in _partition(label))


@pytest.mark.gpu
def test_drop_small_components_on_cuda_equals_cpu():
    torch.manual_seed(0)
    coords, values, blocks = _blocks_field(lambda p: torch.randn(len(p)) * 0.5 + 0.3, 40,
                                           lambda b: torch.rand(len(b)) < 0.4)
    mesh = closed_mesh(coords, values, blocks, 40)
    cpu, gpu = drop_small_components(mesh, 0.05), drop_small_components(mesh, 0.05, "cuda")
    np.testing.assert_array_equal(gpu.faces, cpu.faces)
    np.testing.assert_array_equal(gpu.vertices, cpu.vertices)
