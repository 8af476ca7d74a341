# Session 29 (one GPU), after the session's merges (pipeline loading checks, batch output names, data build
# worker recovery and fsync, checkpoint version 2): the GPU test suite, then a small data build and encode on cuda.
source scripts/gpu/_prelude.sh
# One process: xdist workers share the one GPU, and on an 80 GB H100 -n 4 and -n 2 ran out of memory (session 29).
timeout 500 python3 -m pytest -q -p no:cacheprovider -m gpu -rfs tests 2>&1 | tail -25
el "gpu tests done"
python3 - <<'PY'
import trimesh
from pathlib import Path
src = Path("/tmp/m29"); src.mkdir(exist_ok=True)
trimesh.creation.icosphere(3).export(src / "sphere.obj")
trimesh.creation.box().export(src / "box.glb")
trimesh.creation.torus(1.0, 0.3).export(src / "torus.ply")
PY
python3 -m d3s2.cli data build /tmp/m29 --out /tmp/b29 --resolutions 64,128 --views 1 --image-size 64 --device cuda \
  --workers 2 --no-progress 2>&1 | tail -5; echo "build rc ${PIPESTATUS[0]}"
el "build done"
