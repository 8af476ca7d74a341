"""Serving the image-to-3D pipeline: ``d3s2 app`` (Gradio web app) and ``d3s2 serve`` (FastAPI JSON service).

Both sit on one :class:`~d3s2.app.engine.Engine`: the models load once, one job at a time runs on the device
from a bounded queue, uploads are checked (size, pixels, format) before any work, every job has a timeout,
and results live only in the engine's output folder under server-made job ids, with a size cap.
Needs the ``[app]`` extra (``pip install d3s2[app]``).
"""
