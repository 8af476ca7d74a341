"""d3s2: Direct3D-S2 from scratch. Image to watertight 3D mesh with sparse SDF latents.

Importing d3s2 is cheap and side-effect free: no CUDA calls, no triton import, no prints.
"""

__version__ = "0.1.0"
