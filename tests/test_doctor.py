"""``d3s2 doctor``: the report names the packages, devices, bundled weights and each op's backend choice."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from d3s2 import doctor

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_report_lists_bundled_weights_and_op_backends():
    text = "\n".join(doctor.report())
    for section in ("packages:", "devices:", "bundled weights:", "op backends"):
        assert section in text
    assert "demo SS-VAE" in text and "ss_vae_256" in text and "MiB" in text
    assert "block_attn" in text and "cpu" in text


def test_missing_bundles_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr("d3s2.pipeline.demo_weights_dir", lambda: tmp_path / "none_pipe")
    monkeypatch.setattr("d3s2.models.vae.cli.bundled_vae_dir", lambda: tmp_path / "none_vae")
    lines = doctor.bundled_weights()
    assert len(lines) == 2 and all("missing" in x and "--weights" in x for x in lines)


def test_packages_cover_every_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = [req for name, reqs in project["optional-dependencies"].items() if name != "dev" for req in reqs]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group().lower() for req in project["dependencies"] + extras}
    assert names - set(doctor.PACKAGES) == set()
