"""Conditioning renders by ray casting (embree, or an exact numpy fallback): shaded RGBA images with an exact
alpha mask.

Camera convention (OpenCV):
    * World frame: the mesh's own frame, **+y up** (glTF and 0 A.D. convention). Elevation is measured from the
      xz-plane towards +y; azimuth rotates about +y, starting at +z and turning towards +x.
    * ``world_to_camera`` ``[4, 4]``: ``x_cam = R @ x_world + t``; camera axes x right, y down, z forward (the
      camera looks along +z_cam). The camera centre is ``-R.T @ t``.
    * ``K`` ``[3, 3]`` in pixels: ``fx = fy = focal_mm / 36 * W`` (35 mm film, 36 mm wide), principal point
      ``(W/2, H/2)``. Pixel ``(u, v)`` (column, row) covers ``[u, u+1) × [v, v+1)``; its ray goes through its
      centre, so a point projects to pixel ``floor(K @ x_cam / z)``.

Each image is ``[H, W, 4]`` uint8: two-sided Lambert shading of a grey albedo by a headlight plus a fixed key
light, sRGB-encoded; alpha is 255 exactly on the pixels whose centre ray hits the mesh and 0 elsewhere (RGB 0
there too). Views are deterministic in ``(key, seed)``.

Dimension legend: V views, H×W image size, F faces.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FILM_WIDTH_MM = 36.0
WORLD_UP = np.array([0.0, 1.0, 0.0])
# Fixed key light from the upper front-right, in world coordinates.
KEY_LIGHT = np.array([0.4, 1.0, 0.6]) / np.linalg.norm([0.4, 1.0, 0.6])
AMBIENT, HEADLIGHT, KEY = 0.15, 0.55, 0.45


@dataclass
class Renders:
    """V rendered views of one mesh.

    Attributes:
        images: uint8 ``[V, H, W, 4]`` RGBA.
        intrinsics: float32 ``[V, 3, 3]`` K in pixels.
        world_to_camera: float32 ``[V, 4, 4]`` OpenCV extrinsics.
        elevation_deg, azimuth_deg, focal_mm, distance: float32 ``[V]`` the sampled view parameters
            (distance from the look-at target to the camera centre, world units).
    """

    images: np.ndarray
    intrinsics: np.ndarray
    world_to_camera: np.ndarray
    elevation_deg: np.ndarray
    azimuth_deg: np.ndarray
    focal_mm: np.ndarray
    distance: np.ndarray

    def camera_arrays(self) -> dict[str, np.ndarray]:
        """Everything but the images, for saving next to them."""
        return {"intrinsics": self.intrinsics, "world_to_camera": self.world_to_camera,
                "elevation_deg": self.elevation_deg, "azimuth_deg": self.azimuth_deg,
                "focal_mm": self.focal_mm, "distance": self.distance}


def view_rng(key: str, seed: int) -> np.random.Generator:
    """A generator that depends only on ``(key, seed)`` (not on Python's salted ``hash``)."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def intrinsics(focal_mm: float, width: int, height: int) -> np.ndarray:
    """float64 ``[3, 3]`` K for a 35 mm-film focal length."""
    f = focal_mm / FILM_WIDTH_MM * width
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def look_rotation(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """float64 ``[3, 3]`` world→camera rotation of a camera looking at the target from (elevation, azimuth)."""
    el, az = np.radians(elevation_deg), np.radians(azimuth_deg)
    to_camera = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    forward = -to_camera
    right = np.cross(forward, WORLD_UP)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def fit_distance(vertices: np.ndarray, target: np.ndarray, rotation: np.ndarray, K: np.ndarray,
                 width: int, height: int, margin: float = 0.9) -> float:
    """Smallest distance along the view axis at which every vertex projects inside ``margin`` of the frame.

    The projection of a triangle lies in the convex hull of its projected corners, so fitting the vertices
    fits the whole mesh. Vertices are ``[N, 3]``.
    """
    q = np.einsum("nw,cw->nc", vertices - target, rotation)  # [N, 3] camera-axis coordinates relative to the target
    tan_x = margin * (width / 2) / K[0, 0]
    tan_y = margin * (height / 2) / K[1, 1]
    need = np.maximum(np.abs(q[:, 0]) / tan_x, np.abs(q[:, 1]) / tan_y) - q[:, 2]
    extent = float(np.ptp(vertices, axis=0).max()) or 1.0
    # Keep the nearest vertex a little in front of the camera even for flat or point-like meshes.
    near = float((-q[:, 2]).max()) + 0.05 * extent
    return float(max(need.max(), near))


@functools.cache
def _embree():
    """embreex's scene and mesh modules, or None (the numpy fallback; said once per process)."""
    try:
        from embreex import rtcore_scene
        from embreex.mesh_construction import TriangleMesh
    except ImportError:
        log.warning("embreex is not installed: ray casting uses the numpy fallback (slower; "
                    "pip install 'd3s2[data]' for embree)")
        return None
    return rtcore_scene, TriangleMesh


class RayCaster:
    """First hits of a pinhole camera's pixel-centre rays against one mesh: embree (embreex) when it is installed,
    else an exact numpy caster that tests each ray only against the faces whose projection covers its pixel."""

    # (face, pixel) pairs per numpy step: bounds the fallback's memory (≈ 120 bytes each) whatever the mesh.
    PAIRS_PER_STEP = 1 << 20

    def __init__(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        self.vertices = np.asarray(vertices, np.float64)
        self.faces = np.asarray(faces, np.int64)
        self._scene = None
        embree = _embree()
        if embree is None:
            return
        rtcore_scene, TriangleMesh = embree
        self._scene = rtcore_scene.EmbreeScene()
        TriangleMesh(scene=self._scene, vertices=self.vertices.astype(np.float32),
                     indices=self.faces.astype(np.int32))

    def first_hit(self, K: np.ndarray, world_to_camera: np.ndarray, width: int, height: int) -> np.ndarray:
        """int64 ``[H*W]`` (row-major) index of the first face hit by each pixel's centre ray, -1 for a miss."""
        if self._scene is not None:
            origin, dirs = pixel_rays(K, world_to_camera, width, height)
            origins = np.broadcast_to(origin.astype(np.float32), dirs.shape)
            return self._scene.run(np.ascontiguousarray(origins), np.ascontiguousarray(dirs)).astype(np.int64)
        return self._first_hit_by_projection(np.asarray(K, np.float64), np.asarray(world_to_camera, np.float64),
                                             width, height)

    def _first_hit_by_projection(self, K: np.ndarray, world_to_camera: np.ndarray, width: int,
                                 height: int) -> np.ndarray:
        """The fallback: every face is projected, and each pixel centre in its bounding box gets an exact
        ray-triangle test (Möller–Trumbore, camera frame, ray origin 0); the nearest hit wins, ties to the lower
        face index. A face reaching behind the camera gets every pixel as a candidate (still exact)."""
        tri = (self.vertices @ world_to_camera[:3, :3].T + world_to_camera[:3, 3])[self.faces]  # [F, 3, 3]
        z = tri[..., 2]
        visible = np.flatnonzero((z > 0).any(1))  # wholly behind the camera: no ray hits it
        tri, z = tri[visible], z[visible]
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        in_front = (z > 0).all(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(in_front[:, None], fx * tri[..., 0] / z + cx - 0.5, 0.0)  # pixel-centre index units
            v = np.where(in_front[:, None], fy * tri[..., 1] / z + cy - 0.5, 0.0)
        u_lo = np.where(in_front, np.ceil(u.min(1)), 0).clip(0, None).astype(np.int64)
        u_hi = np.where(in_front, np.floor(u.max(1)), width - 1).clip(None, width - 1).astype(np.int64)
        v_lo = np.where(in_front, np.ceil(v.min(1)), 0).clip(0, None).astype(np.int64)
        v_hi = np.where(in_front, np.floor(v.max(1)), height - 1).clip(None, height - 1).astype(np.int64)
        box_w = np.maximum(u_hi - u_lo + 1, 0)
        pairs = box_w * np.maximum(v_hi - v_lo + 1, 0)
        best_depth = np.full(width * height, np.inf)
        best_face = np.full(width * height, -1, np.int64)
        step_of = np.cumsum(pairs) // self.PAIRS_PER_STEP  # faces in order, about PAIRS_PER_STEP pairs per step
        for step in np.unique(step_of[pairs > 0]):
            faces = np.flatnonzero((step_of == step) & (pairs > 0))
            n = pairs[faces]
            f = np.repeat(faces, n)
            k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # index within the face's box
            pu, pv = u_lo[f] + k % box_w[f], v_lo[f] + k // box_w[f]
            d = np.stack([(pu + 0.5 - cx) / fx, (pv + 0.5 - cy) / fy, np.ones(len(f))], 1)
            p0, e1, e2 = tri[f, 0], tri[f, 1] - tri[f, 0], tri[f, 2] - tri[f, 0]
            pvec = np.cross(d, e2)
            det = np.einsum("ij,ij->i", e1, pvec)
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = 1.0 / det
                b1 = np.einsum("ij,ij->i", -p0, pvec) * inv
                qvec = np.cross(-p0, e1)
                b2 = np.einsum("ij,ij->i", d, qvec) * inv
                depth = np.einsum("ij,ij->i", e2, qvec) * inv  # along d, whose z is 1: the hit's camera z
            hit = (det != 0) & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (depth > 0)
            pixel, depth, face = (pv * width + pu)[hit], depth[hit], visible[f[hit]]
            order = np.lexsort((face, depth, pixel))
            pixel, depth, face = pixel[order], depth[order], face[order]
            first = np.r_[True, pixel[1:] != pixel[:-1]]  # the nearest hit of each pixel in this step
            pixel, depth, face = pixel[first], depth[first], face[first]
            better = (depth < best_depth[pixel]) | ((depth == best_depth[pixel]) & (face < best_face[pixel]))
            best_depth[pixel[better]], best_face[pixel[better]] = depth[better], face[better]
        return best_face


def pixel_rays(K: np.ndarray, world_to_camera: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The camera centre ``[3]`` and float32 ``[H*W, 3]`` world directions of the pixel-centre rays (row-major;
    each with camera-frame z = 1)."""
    R, t = world_to_camera[:3, :3], world_to_camera[:3, 3]
    u = (np.arange(width, dtype=np.float32) + 0.5 - K[0, 2]) / K[0, 0]
    v = (np.arange(height, dtype=np.float32) + 0.5 - K[1, 2]) / K[1, 1]
    dirs_cam = np.empty((height, width, 3), np.float32)
    dirs_cam[..., 0] = u[None, :]
    dirs_cam[..., 1] = v[:, None]
    dirs_cam[..., 2] = 1.0
    # R.T applied per row; einsum: numpy's matmul is slow for [N, 3] @ [3, 3].
    return -R.T @ t, np.einsum("nc,cw->nw", dirs_cam.reshape(-1, 3), R.astype(np.float32))


def render_view(caster: RayCaster, face_normals: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray,
                width: int, height: int, albedo: tuple[float, float, float] = (0.8, 0.8, 0.8)) -> np.ndarray:
    """Ray-cast one view: uint8 ``[H, W, 4]`` RGBA (see the module docstring for the camera and shading).

    ``face_normals`` ``[F, 3]`` are unit normals of the caster's faces.
    """
    _, dirs = pixel_rays(K, world_to_camera, width, height)
    tri = caster.first_hit(K, world_to_camera, width, height)
    ray = np.flatnonzero(tri >= 0)
    image = np.zeros((height * width, 4), np.uint8)
    if len(ray):
        n = face_normals[tri[ray]]  # [M, 3]
        d = dirs[ray].astype(np.float64)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        # Two-sided: flip normals that face away from the camera (real meshes have inconsistent winding).
        n = n * -np.sign(np.einsum("ij,ij->i", n, d) + 1e-12)[:, None]
        light = AMBIENT + HEADLIGHT * np.clip(np.einsum("ij,ij->i", n, -d), 0, 1) \
            + KEY * np.clip(np.einsum("ij,j->i", n, KEY_LIGHT), 0, 1)
        rgb = np.clip(light[:, None] * np.asarray(albedo)[None, :], 0, 1) ** (1 / 2.2)
        image[ray, :3] = np.round(rgb * 255).astype(np.uint8)
        image[ray, 3] = 255
    return image.reshape(height, width, 4)


def view_camera(vertices: np.ndarray, elevation_deg: float, azimuth_deg: float, focal_mm: float, size: int,
                margin: float = 0.9) -> tuple[np.ndarray, np.ndarray, float]:
    """``(K [3, 3], world_to_camera [4, 4], distance)`` of a ``size``² view looking at the centre of the vertices'
    bounding box from the fitted distance (:func:`fit_distance`)."""
    target = (vertices.min(0) + vertices.max(0)) / 2
    K = intrinsics(focal_mm, size, size)
    R = look_rotation(elevation_deg, azimuth_deg)
    dist = fit_distance(vertices, target, R, K, size, size, margin)
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ (target - dist * R[2])  # R[2] is the forward axis
    return K, w2c, dist


def render_views(mesh, num_views: int = 8, *, size: int = 518, seed: int = 0, key: str = "",
                 elevation_deg: tuple[float, float] = (10.0, 40.0), azimuth_deg: tuple[float, float] = (0.0, 180.0),
                 focal_mm: tuple[float, float] = (30.0, 100.0), margin: float = 0.9) -> Renders:
    """Render ``num_views`` views with elevation, azimuth and focal length drawn uniformly from the given ranges.

    The camera looks at the centre of the mesh's bounding box from the fitted distance (:func:`fit_distance`).
    ``key`` (e.g. the asset name) and ``seed`` fix the views.
    """
    if num_views < 1:
        raise ValueError(f"expected num_views >= 1, got {num_views}")
    if size < 1:
        raise ValueError(f"expected a positive image size, got {size}")
    rng = view_rng(key, seed)
    els = rng.uniform(*elevation_deg, size=num_views)
    azs = rng.uniform(*azimuth_deg, size=num_views)
    focals = rng.uniform(*focal_mm, size=num_views)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    caster = RayCaster(vertices, mesh.faces)
    normals = np.asarray(mesh.face_normals, np.float64)
    images, Ks, w2cs, dists = [], [], [], []
    for el, az, fm in zip(els, azs, focals):
        K, w2c, dist = view_camera(vertices, el, az, fm, size, margin)
        images.append(render_view(caster, normals, K, w2c, size, size))
        Ks.append(K)
        w2cs.append(w2c)
        dists.append(dist)
    f32 = np.float32
    return Renders(np.stack(images), np.stack(Ks).astype(f32), np.stack(w2cs).astype(f32), els.astype(f32),
                   azs.astype(f32), focals.astype(f32), np.asarray(dists, f32))


def project(points: np.ndarray, K: np.ndarray, world_to_camera: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``[N, 2]`` (u, v) of world points ``[N, 3]`` in front of the camera."""
    cam = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:3]


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 4]`` RGBA image (lossless, deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 ``[H, W, 4]`` RGBA from PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA"))
