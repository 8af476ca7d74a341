"""``d3s2 app``: the Gradio web app over an :class:`~d3s2.app.engine.Engine`.

Two tabs:

* **Generate**: upload an image (or pick an example), see the conditioner's view of it (the composited crop and
  the foreground mask it will use), choose resolution, seed, steps, CFG and a target face count, follow the
  progress per stage, turn the result in a 3D viewer and download it as GLB, OBJ or PLY.
* **Reconstruct**: upload a mesh → SS-VAE encode/decode round trip, shown beside the input.

Uploads go through the engine's checks (size, pixels, format: a bad file is an error message in the page) and
every job through the engine's queue, so the app and the API behave the same. Results are served from their job
folders, never copied into Gradio's cache: the engine's results cap bounds them all, and a result the cap removed
is gone from the page as from the API. Call :func:`build_app` after pointing ``GRADIO_TEMP_DIR`` inside the
engine's output folder (``d3s2 app`` does), so that Gradio's copies of uploads stay there too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from .engine import (
    INPUT_NAME,
    MAX_SEED,
    UPLOAD_MESH_SUFFIXES,
    Engine,
    GenerateParams,
    RequestError,
    read_image,
    read_mesh,
)

POLL_S = 0.2


def example_images() -> list[str]:
    """Paths of the bundled example PNGs (renders of the example meshes)."""
    root = resources.files("d3s2") / "assets" / "examples"
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".png"))


def _error(message: str) -> gr.Error:
    # Shown until closed: a message that fades after a few seconds is easy to miss. A user's bad upload or a
    # failed job is no server fault: no traceback in the server's console.
    return gr.Error(message, duration=None, print_exception=False)


def _read_upload(path: str | None) -> bytes:
    if not path:
        raise _error("upload an image first (or pick an example)")
    return Path(path).read_bytes()


def preview(engine: Engine, path: str | None) -> np.ndarray | None:
    """uint8 ``[S, 2S, 3]``: the conditioner's input (crop on white) beside the foreground mask it uses."""
    from ..models.conditioner import preprocess_image

    if not path:
        return None
    try:
        image = read_image(_read_upload(path), engine.limits)
        # The first stage's encoder (the shared conditioner, or the dense DiT's own one).
        encoder = engine.pipeline.encoder_for("dense_dit")
        prepared = preprocess_image(image, size=max(encoder.image_size, 256))
    except (RequestError, ValueError) as err:
        raise _error(str(err)) from err
    rgb = prepared.rgb.permute(1, 2, 0).numpy()
    mask = np.repeat(prepared.mask.numpy()[..., None], 3, axis=2)
    return np.round(np.concatenate([rgb, mask], axis=1) * 255).astype(np.uint8)


def _wait(job: Any, progress: gr.Progress) -> None:
    while not job.finished.wait(POLL_S):
        if job.status == "queued":
            progress(0.0, desc="waiting in the queue")
        elif job.stage_total:
            progress((job.stage_index, job.stage_total), desc=job.stage, unit="stages")
    if job.status != "done":
        raise _error(f"{job.kind} {job.status}: {job.error}")


def _downloads(engine: Engine, job: Any) -> list[str]:
    """The result in every download format, written beside ``mesh.glb`` in the job's folder (under the cap)."""
    try:
        return [str(p) for p in engine.write_downloads(job)]
    except FileNotFoundError:  # a later job's results cap removed it since this one finished
        raise _error(f"job {job.id}: the result was removed (results size cap); run it again") from None


def _summary(job: Any) -> str:
    r = job.result
    lines = [f"**{r['faces']} faces**, {r['vertices']} vertices, watertight: {r['watertight']}, "
             f"{r['resolution']}³, {r['wall_seconds']:.1f} s on {job.kind} job `{job.id}`"]
    if "seconds" in r:
        lines.append(", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items() if k != "total"))
    return "\n\n".join(lines)


def build_app(engine: Engine) -> gr.Blocks:
    """The Gradio Blocks of ``d3s2 app`` (not launched)."""
    # Gradio copies every file an event returns into its cache, unless the file lies under a static path; such
    # copies would outlive the results cap (up to an hour, delete_cache below). Process-wide in Gradio, and the
    # job files never change once written (atomically, before an event returns their paths).
    gr.set_static_paths([engine.jobs_dir])
    resolutions = engine.pipeline.resolutions
    on_cpu = engine.device == "cpu"

    # Gradio finds its progress tracker through a gr.Progress() default argument.
    def generate(path: str | None, resolution: int, seed: float, steps: float, cfg: float, faces: float,
                 progress: gr.Progress = gr.Progress()) -> tuple[str, list[str], str]:  # noqa: B008
        try:
            image = read_image(_read_upload(path), engine.limits)
            params = GenerateParams(resolution=int(resolution), seed=int(seed or 0),
                                    steps=int(steps) if steps else None, cfg=float(cfg) if cfg else None,
                                    faces=int(faces) if faces else None)
            job = engine.submit_generate(image, params)
        except RequestError as err:
            raise _error(err.message) from err
        _wait(job, progress)
        files = _downloads(engine, job)
        return files[0], files, _summary(job)

    def reconstruct(path: str | None, resolution: int,
                    progress: gr.Progress = gr.Progress()) -> tuple[str, str, list[str], str]:  # noqa: B008
        if not path:
            raise _error("upload a mesh first")
        try:
            mesh = read_mesh(Path(path).read_bytes(), Path(path).suffix, engine.limits)
            job = engine.submit_reconstruct(mesh, int(resolution))
        except RequestError as err:
            raise _error(err.message) from err
        _wait(job, progress)
        files = _downloads(engine, job)
        return str(job.folder / f"{INPUT_NAME}.glb"), files[0], files, _summary(job)

    with gr.Blocks(title="d3s2: image → 3D", delete_cache=(600, 3600)) as app:
        gr.Markdown("# d3s2: image → watertight 3D mesh\nDirect3D-S2 from scratch. "
                    f"Device: `{engine.device}`; mesh resolutions {resolutions}. One job runs at a time.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    image = gr.File(label="Image (RGBA with the object's alpha works best)", file_types=["image"],
                                    type="filepath", elem_id="image-upload")
                    gr.Examples(example_images(), inputs=[image], label="Examples")
                    mask = gr.Image(label="Conditioner input and foreground mask", interactive=False,
                                    elem_id="mask-preview")
                    with gr.Row():
                        # On the CPU the lowest resolution is the only practical default.
                        res = gr.Dropdown(resolutions, value=resolutions[0] if on_cpu else resolutions[-1],
                                          label="Resolution")
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    with gr.Row():
                        steps = gr.Slider(0, engine.limits.max_steps, value=0, step=1,
                                          label="Steps (0 = per-stage default)")
                        cfg = gr.Slider(0, 15, value=0, step=0.5, label="CFG (0 = per-stage default)")
                    faces = gr.Number(0, label="Target faces (0 = no decimation)", precision=0, minimum=0)
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    viewer = gr.Model3D(label="Result", elem_id="result-viewer", height=420)
                    downloads = gr.File(label="Download (GLB, OBJ, PLY)", file_count="multiple",
                                        elem_id="result-files")
                    info = gr.Markdown(elem_id="result-info")
            image.change(lambda p: preview(engine, p), inputs=[image], outputs=[mask], concurrency_limit=None)
            run.click(generate, inputs=[image, res, seed, steps, cfg, faces], outputs=[viewer, downloads, info],
                      concurrency_id="engine")
        with gr.Tab("Reconstruct (SS-VAE)"):
            gr.Markdown("Encode and decode a mesh with the sparse SDF VAE to inspect it (left: input, right: "
                        "round trip).")
            with gr.Row():
                mesh_in = gr.File(label="Mesh", file_types=list(UPLOAD_MESH_SUFFIXES), type="filepath",
                                  elem_id="mesh-upload")
                vae_res = gr.Dropdown(resolutions, value=resolutions[0], label="VAE resolution")
                rec = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
            with gr.Row():
                shown_in = gr.Model3D(label="Input", height=360)
                shown_out = gr.Model3D(label="VAE round trip", height=360)
            rec_files = gr.File(label="Download", file_count="multiple")
            rec_info = gr.Markdown()
            rec.click(reconstruct, inputs=[mesh_in, vae_res], outputs=[shown_in, shown_out, rec_files, rec_info],
                      concurrency_id="engine")
    # The engine runs one job at a time; these limits only bound the waiting page events.
    app.queue(max_size=engine.limits.max_queue + 1, default_concurrency_limit=engine.limits.max_queue + 1)
    return app
