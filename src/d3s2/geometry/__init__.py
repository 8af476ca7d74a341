"""Geometry: mesh I/O and normalisation, narrow-band sparse SDF, sparse marching cubes, export, metrics."""

from d3s2.geometry.marching_cubes import build_tables, marching_cubes_mesh, sparse_marching_cubes
from d3s2.geometry.mesh_io import MeshError, NormalizeTransform, load_mesh, normalize_mesh, validate_mesh
from d3s2.geometry.sdf import SparseSDF, compute_sparse_sdf

__all__ = [
    "MeshError",
    "NormalizeTransform",
    "SparseSDF",
    "build_tables",
    "compute_sparse_sdf",
    "load_mesh",
    "marching_cubes_mesh",
    "normalize_mesh",
    "sparse_marching_cubes",
    "validate_mesh",
]
