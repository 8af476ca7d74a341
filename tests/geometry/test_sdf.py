import itertools

import numpy as np
import pytest
import torch
import trimesh

from d3s2.geometry.marching_cubes import marching_cubes_mesh
from d3s2.geometry.sdf import SparseSDF, compute_sparse_sdf, voxel_centers

igl = pytest.importorskip("igl")  # the data extra: these tests compare with libigl


def _box_sdf(p, half):
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)


@pytest.mark.parametrize("backend", ["igl", "torch"])
def test_box_matches_analytic_sdf(backend):
    half = np.array([0.5, 0.4, 0.3])
    box = trimesh.creation.box(extents=2 * half)
    r = 32
    s = compute_sparse_sdf(box, r, band=2.9 / r, backend=backend)[r]
    exact = _box_sdf(voxel_centers(s.coords, r), half)
    assert len(s) > 1000
    assert np.abs(s.sdf - exact).max() < 0.01 * (2 / r)
    # Every voxel within the band is present, none outside it.
    ax = np.arange(r)
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    assert (np.abs(_box_sdf(voxel_centers(grid, r), half)) < 2.9 / r).sum() == len(s)
    # Flags: every box edge is sharp (90 degrees).
    assert s.sharp.any() and not s.sharp.all()


def test_sphere_matches_analytic_sdf():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.6)
    r = 32
    s = compute_sparse_sdf(sphere, r, band=2 / r)[r]
    exact = np.linalg.norm(voxel_centers(s.coords, r), axis=1) - 0.6
    assert np.abs(s.sdf - exact).max() < 0.01 * (2 / r)
    assert not s.sharp.any()


def test_closed_inside_out_mesh_gets_the_same_signs():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    inverted = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False)
    assert inverted.volume < 0
    r = 32
    a = compute_sparse_sdf(sphere, r, band=2 / r)[r]
    b = compute_sparse_sdf(inverted, r, band=2 / r)[r]
    assert np.array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.sdf, b.sdf, atol=1e-6)
    assert (a.sdf < 0).any() and (a.sdf > 0).any()


@pytest.mark.parametrize("backend", ["igl", "torch"])
def test_sign_agrees_with_winding_number_on_watertight_mesh(backend):
    torus = trimesh.creation.torus(major_radius=0.55, minor_radius=0.25, major_sections=24, minor_sections=12)
    assert torus.is_watertight
    r = 40
    s = compute_sparse_sdf(torus, r, band=5 / r, backend=backend)[r]
    w = igl.fast_winding_number(torus.vertices, torus.faces.astype(np.int64), voxel_centers(s.coords, r))
    assert ((s.sdf < 0) == (w >= 0.5)).all()
    # The off-band inside bits of the blocks agree too.
    blocks, target = s.block_targets()
    vox = (blocks[:, None, :] * 8 + np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(1, -1, 3))
    wb = igl.fast_winding_number(torus.vertices, torus.faces.astype(np.int64),
                                 voxel_centers(vox.reshape(-1, 3), r)).reshape(target.shape)
    assert ((target < 0) == (wb >= 0.5)).mean() > 0.999


def test_backends_give_the_same_answer():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh.apply_translation([0.1, -0.05, 0.02])
    a = compute_sparse_sdf(mesh, [24, 32], band=2 / 24, backend="igl")
    b = compute_sparse_sdf(mesh, [24, 32], band=2 / 24, backend="torch")
    for r in (24, 32):
        assert np.array_equal(a[r].coords, b[r].coords)
        assert np.abs(a[r].sdf - b[r].sdf).max() < 1e-5
        assert np.array_equal(a[r].block_coords, b[r].block_coords)
        assert np.array_equal(a[r].block_inside, b[r].block_inside)


def _damaged_meshes():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    holes = sphere.copy()
    holes.update_faces(holes.triangles_center[:, 2] < 0.4)  # an open cap
    flipped = sphere.copy()
    faces = flipped.faces.copy()
    pick = np.random.default_rng(0).choice(len(faces), len(faces) // 10, replace=False)
    faces[pick] = faces[pick][:, ::-1]
    flipped = trimesh.Trimesh(flipped.vertices, faces, process=False)
    dup = trimesh.Trimesh(sphere.vertices, np.concatenate([sphere.faces, sphere.faces]), process=False)
    b1 = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    b2 = b1.copy()
    b2.apply_translation([0.4, 0.3, 0.2])
    parts = trimesh.util.concatenate([b1, b2])  # two overlapping parts, self-intersecting
    union = 2 * 0.512 - 0.4 * 0.5 * 0.6
    full = 4 / 3 * np.pi * 0.6**3
    cap = np.pi * 0.2**2 * (3 * 0.6 - 0.2) / 3  # the hole is closed by a roughly flat membrane at z ~ 0.4
    return {"holes": (holes, full - cap), "flipped": (flipped, full), "duplicated": (dup, full),
            "parts": (parts, union)}


@pytest.mark.parametrize("name", ["holes", "flipped", "duplicated", "parts"])
def test_damaged_meshes_give_closed_band_and_sensible_sign(name):
    mesh, volume = _damaged_meshes()[name]
    r = 32
    s = compute_sparse_sdf(mesh, r, band=2 / r)[r]  # a one-voxel band, as at 256^3 with the default band
    out = marching_cubes_mesh(s)
    assert out.is_watertight
    assert out.volume == pytest.approx(volume, rel=0.08)


def test_block_targets_and_arrays_roundtrip():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    s = compute_sparse_sdf(mesh, 32, band=1.5 / 32)[32]
    blocks, target = s.block_targets()
    assert blocks.dtype == np.int32 and target.shape == (len(blocks), 512)
    assert np.abs(target).max() <= s.band
    # Voxel order inside a block: (lx, ly, lz) lexicographic.
    b = np.nonzero((blocks == s.coords[0] // 8).all(1))[0][0]
    lx, ly, lz = s.coords[0] % 8
    assert target[b, (lx * 8 + ly) * 8 + lz] == s.sdf[0]
    sub_blocks, sub_target = s.block_targets(4)
    assert sub_target.shape == (8 * len(blocks), 64) and len(sub_blocks) == 8 * len(blocks)
    again = SparseSDF.from_arrays(s.to_arrays())
    assert np.array_equal(again.coords, s.coords) and np.array_equal(again.sharp, s.sharp)
    assert np.array_equal(again.block_targets()[1], target)
    with pytest.raises(ValueError, match="divide"):
        s.block_targets(3)


def test_round_trip_chamfer_below_half_voxel():
    from d3s2.geometry.metrics import mesh_metrics

    mesh = trimesh.creation.torus(major_radius=0.55, minor_radius=0.25, major_sections=48, minor_sections=24)
    r = 48
    s = compute_sparse_sdf(mesh, r, band=4 / r)[r]
    out = marching_cubes_mesh(s.coords, s.sdf, r)  # band voxels only: a 2-voxel band is closed
    assert out.is_watertight
    m = mesh_metrics(out, mesh, num_samples=20000, num_volume_points=20000)
    assert m["chamfer_l1"] < 0.5 * (2 / r)
    assert m["volume_iou"] > 0.95


def test_bad_arguments():
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    with pytest.raises(ValueError, match="multiples of 8"):
        compute_sparse_sdf(mesh, 30)
    with pytest.raises(ValueError, match="normalise"):
        compute_sparse_sdf(trimesh.creation.icosphere(radius=3.0), 32)
    with pytest.raises(ValueError, match="unknown SDF backend"):
        compute_sparse_sdf(mesh, 16, backend="nope")


def test_a_band_that_misses_every_voxel_centre_says_to_widen_it():
    # One flat triangle at z = 0, between two layers of voxel centres (z = ±1/32 at 32³), edges on the box faces.
    sheet = trimesh.Trimesh([[0.95, 0.95, 0.0], [-0.95, 0.95, 0.0], [-0.95, -0.95, 0.0]], [[0, 1, 2]], process=False)
    with pytest.raises(ValueError, match=r"narrower than half a voxel diagonal \(0\.054\d*\).*wider --band"):
        compute_sparse_sdf(sheet, [32], band=1 / 128, warn_narrow_band=False)
    assert len(compute_sparse_sdf(sheet, [32], band=1 / 16)[32]) > 0


def test_open_sheet_becomes_a_thin_closed_shell():
    sheet = trimesh.Trimesh([[-0.5, -0.5, 0.01], [0.5, -0.5, 0.01], [0.5, 0.5, 0.01], [-0.5, 0.5, 0.01]],
                            [[0, 1, 2], [0, 2, 3]], process=False)
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.2)
    sphere.apply_translation([0, 0, 0.5])
    r = 32
    s = compute_sparse_sdf(trimesh.util.concatenate([sheet, sphere]), r, band=4 / r)[r]
    out = marching_cubes_mesh(s)
    assert out.is_watertight
    parts = out.split(only_watertight=True)
    assert len(parts) == 2
    slab = min(parts, key=lambda m: abs(m.center_mass[2] - 0.01))
    eps = 2 / r  # one voxel each side of the sheet, rounded along the rim
    assert slab.volume == pytest.approx(1.0 * 2 * eps + 4 * np.pi * eps**2 / 2, rel=0.05)


def test_label_components_matches_scipy():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from d3s2.geometry.sdf import label_components

    rng = np.random.default_rng(0)
    n = 3000
    # Chains (long paths need many rounds without pointer jumping) plus random short-range edges.
    src = np.concatenate([np.arange(0, 999), rng.integers(1000, n, 1500)])
    dst = np.concatenate([np.arange(1, 1000), np.minimum(src[999:] + rng.integers(1, 40, 1500), n - 1)])
    _, ref = connected_components(coo_matrix((np.ones(src.size), (src, dst)), shape=(n, n)), directed=False)
    got = label_components(torch.from_numpy(dst), torch.from_numpy(src), n).numpy()
    # Same partition, and each label is the smallest member of its component.
    assert np.array_equal(np.unique(ref, return_inverse=True)[1], np.unique(got, return_inverse=True)[1])
    assert (got <= np.arange(n)).all() and (got[got] == got).all()
    assert got[:1000].max() == 0 and len(np.unique(got)) == len(np.unique(ref))


def test_torch_bookkeeping_with_label_propagation_matches_igl(monkeypatch):
    """The GPU path's connected components (label propagation) give the igl path's outputs, run on the CPU."""
    import d3s2.geometry.sdf as sdf_mod

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    holes = sphere.copy()
    holes.update_faces(holes.triangles_center[:, 2] < 0.4)
    r = 32
    a = compute_sparse_sdf(holes, r, band=3 / r, backend="igl")[r]
    monkeypatch.setattr(sdf_mod, "_components", sdf_mod.label_components)
    b = compute_sparse_sdf(holes, r, band=3 / r, backend="igl")[r]
    for k, v in a.to_arrays().items():
        assert np.array_equal(v, b.to_arrays()[k]), k


@pytest.mark.gpu
def test_cuda_backend_matches_igl_on_damaged_meshes():
    """The GPU path (torch field and bookkeeping on CUDA, label-propagation components) gives the igl answer."""
    for name in ("holes", "flipped"):  # "parts" differs by 59 band voxels between torch and igl also on the CPU
        mesh, _ = _damaged_meshes()[name]
        r = 32
        a = compute_sparse_sdf(mesh, r, band=3 / r, backend="igl")[r]
        b = compute_sparse_sdf(mesh, r, band=3 / r, device="cuda")[r]
        assert np.array_equal(a.coords, b.coords), name
        assert np.abs(a.sdf - b.sdf).max() < 1e-5, name
        assert np.array_equal(a.sharp, b.sharp), name
        assert np.array_equal(a.block_coords, b.block_coords), name
        assert np.array_equal(a.block_inside, b.block_inside), name


def test_open_mesh_reading_inside_on_both_sides_is_reversed(monkeypatch):
    """Crossed billboard quads of a clockwise asset can read as inside on both sides with no boundary at all."""
    from d3s2.geometry import sdf as sdf_module

    sheet = trimesh.Trimesh([[-0.5, -0.5, 0.01], [0.5, -0.5, 0.01], [0.5, 0.5, 0.01], [-0.5, 0.5, 0.01]],
                            [[0, 1, 2], [0, 2, 3]], process=False)
    real = sdf_module.classify_triangles
    seen = []

    def first_call_all_internal(field, mesh):
        seen.append(np.asarray(mesh.faces).copy())
        classes = real(field, mesh)
        return np.full_like(classes, 2) if len(seen) == 1 else classes

    monkeypatch.setattr(sdf_module, "classify_triangles", first_call_all_internal)
    r = 32
    s = compute_sparse_sdf(sheet, r, band=4 / r)[r]
    assert len(seen) == 2 and np.array_equal(seen[1], seen[0][:, ::-1])  # classified again, faces reversed
    assert len(s) > 0 and marching_cubes_mesh(s).is_watertight


def test_mesh_without_usable_surface_gets_a_clear_error(monkeypatch):
    from d3s2.geometry import sdf as sdf_module

    monkeypatch.setattr(sdf_module, "classify_triangles", lambda field, mesh: np.full(len(mesh.faces), 2, np.int8))
    with pytest.raises(ValueError, match="no usable surface: all 12 triangles"):
        compute_sparse_sdf(trimesh.creation.box(extents=(0.5, 0.5, 0.5)), 16)


def test_band_signs_skip_only_what_is_not_needed(monkeypatch):
    """With ``needed``, band voxels whose sign is used get the signs of the full evaluation, from fewer winding
    numbers (components without a needed voxel get no vote)."""
    import d3s2.geometry.sdf as sdf_mod

    mesh, _ = _damaged_meshes()["parts"]  # internal faces: band voxels nearest to them may need no sign
    captured = {}
    real_signs = sdf_mod.band_signs

    def capture(field, coords, udf, exact, resolution, needed=None):
        captured.update(field=field, args=(coords, udf, exact, resolution), needed=needed)
        return real_signs(field, coords, udf, exact, resolution, needed=needed)

    monkeypatch.setattr(sdf_mod, "band_signs", capture)
    compute_sparse_sdf(mesh, 32, band=2 / 32)  # one voxel, as at 256³
    field, args, needed = captured["field"], captured["args"], captured["needed"]
    coords, _, exact, r = args
    exact_centers = {tuple(c) for c in voxel_centers(coords[exact], r).tolist()}
    votes = []
    real_inside = field.inside
    monkeypatch.setattr(field, "inside", lambda p: votes.append(sum(tuple(c) not in exact_centers
                                                                    for c in p.tolist())) or real_inside(p))
    full = real_signs(field, *args)
    full_votes = sum(votes)
    votes.clear()
    part = real_signs(field, *args, needed=needed)
    assert 0 < needed.sum() < len(needed)
    assert torch.equal(part[needed], full[needed])
    assert 0 < sum(votes) < full_votes


def test_pack_bits_matches_numpy():
    from d3s2.geometry.sdf import pack_bits

    bits = torch.rand(5, 512) < 0.5
    assert np.array_equal(pack_bits(bits).numpy(), np.packbits(bits.numpy(), axis=1))


def _close_blocks_naive(inside_fn, resolution, blocks):
    """The closure rule spelled out: until nothing changes, add every missing block whose 26 present neighbours'
    touching voxels hold both signs (dense bookkeeping, whole grid re-examined every round)."""
    from d3s2.geometry.sdf import BLOCK

    g = resolution // BLOCK
    ax = np.arange(BLOCK)
    local = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    bits = {}

    def fill(b):
        centres = (np.asarray(b) * BLOCK + local + 0.5) * (2.0 / resolution) - 1.0
        v = inside_fn(torch.from_numpy(centres)).numpy().reshape(BLOCK, BLOCK, BLOCK).copy()
        for axis in range(3):  # off-band voxels on the grid's outer faces count as outside
            idx = [slice(None)] * 3
            if b[axis] == 0:
                idx[axis] = 0
                v[tuple(idx)] = False
            if b[axis] == g - 1:
                idx[axis] = BLOCK - 1
                v[tuple(idx)] = False
        bits[b] = v

    for b in blocks:
        fill(b)
    while True:
        added = []
        for bx, by, bz in itertools.product(range(g), repeat=3):
            if (bx, by, bz) in bits:
                continue
            seen = set()
            for d in itertools.product((-1, 0, 1), repeat=3):
                nb = (bx - d[0], by - d[1], bz - d[2])
                if d == (0, 0, 0) or nb not in bits:
                    continue
                side = tuple(slice(None) if x == 0 else (0 if x < 0 else BLOCK - 1) for x in d)
                seen |= set(np.unique(bits[nb][side]).tolist())
            if seen == {False, True}:
                added.append((bx, by, bz))
        if not added:
            return bits
        for b in added:
            fill(b)


def test_close_blocks_matches_the_rule_spelled_out():
    """A membrane (a wavy sheet where the sign flips with no surface) crossing a few seed blocks: the closure
    must add exactly the blocks the naive rule adds, with the same inside bits."""
    from d3s2.geometry.sdf import BLOCK, _close_blocks

    class Field:
        device = torch.device("cpu")
        calls = 0

        def inside(self, p):
            self.calls += 1
            p = torch.as_tensor(p, dtype=torch.float64)
            return p[:, 0] + 0.3 * torch.sin(4 * p[:, 1]) + 0.2 * p[:, 2] ** 2 > 0.1

    resolution = 64
    g = resolution // BLOCK
    seeds = [(3, 2, 4), (4, 6, 1), (0, 0, 0), (7, 3, 7)]
    want = _close_blocks_naive(Field().inside, resolution, seeds)
    field = Field()
    keys = torch.tensor(sorted((x * g + y) * g + z for x, y, z in seeds))
    bc = torch.stack([keys // (g * g), (keys // g) % g, keys % g], 1)
    inside = torch.stack([torch.from_numpy(want[tuple(b)]) for b in bc.tolist()])
    got_keys, got_inside = _close_blocks(field, resolution, keys, inside, max_rounds=4 * g)
    got_coords = torch.stack([got_keys // (g * g), (got_keys // g) % g, got_keys % g], 1).tolist()
    got = {tuple(b): v for b, v in zip(got_coords, got_inside.numpy(), strict=True)}
    assert len(want) > 3 * len(seeds) and got.keys() == want.keys()
    assert all(np.array_equal(got[b], want[b]) for b in want)
    assert torch.equal(got_keys, torch.sort(got_keys).values)
    assert 1 < field.calls < 4 * g  # one winding call per round that adds blocks
