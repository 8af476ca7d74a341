"""The npz mesh corpus reader on the committed tiny 0 A.D. fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from d3s2.data.corpus import ENV_VAR, MeshCorpus, find_corpus, save_corpus

TINY = Path(__file__).resolve().parents[1] / "assets" / "0ad_tiny.npz"


def test_names_categories_and_arrays():
    corpus = MeshCorpus(TINY)
    assert len(corpus) == 5
    assert corpus.categories() == ["gaia", "props", "skeletal", "structural"]
    assert corpus.names("props") == ["props/ashoka_lion", "props/brit_workshop_ram_wheels"]
    assert "gaia/bamboo_1" in corpus and corpus.names() == sorted(corpus.names())
    v, f = corpus.arrays("gaia/bamboo_1")
    assert v.dtype == np.float32 and v.shape[1] == 3 and f.dtype == np.int64 and f.shape == (234, 3)
    with pytest.raises(KeyError, match="nope"):
        corpus.arrays("nope")
    with pytest.raises(ValueError, match="unknown category 'x'"):
        corpus.names("x")


def test_mesh_is_validated_trimesh():
    mesh = MeshCorpus(TINY).mesh("skeletal/animal_boar")
    assert len(mesh.faces) == 362


def test_find_corpus_env_and_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(TINY))
    monkeypatch.chdir(tmp_path)
    assert find_corpus() == TINY
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(FileNotFoundError, match=f"`--corpus` on the command line.* or set {ENV_VAR}"):
        find_corpus()


def test_save_round_trip(tmp_path):
    v = np.random.rand(5, 3).astype(np.float32)
    f = np.array([[0, 1, 2], [2, 3, 4]])
    save_corpus(tmp_path / "c.npz", {"gaia/a": (v, f), "props/sub/b": (v, f[:1])})
    corpus = MeshCorpus(tmp_path / "c.npz")
    assert corpus.names() == ["gaia/a", "props/sub/b"]
    np.testing.assert_array_equal(corpus.arrays("props/sub/b")[1], f[:1])
    with pytest.raises(ValueError, match="does not fit uint16"):
        save_corpus(tmp_path / "d.npz", {"x": (v, np.array([[0, 1, 70000]]))})
    assert not (tmp_path / "d.npz").exists()


def test_mesh_reverses_clockwise_game_winding():
    corpus = MeshCorpus(TINY)
    closed = [n for n in corpus.names() if corpus.mesh(n).is_watertight]
    assert closed, "the fixture should contain closed meshes"
    for name in closed:
        assert corpus.mesh(name).volume > 0, name  # outward-facing after the flip
        v, f = corpus.arrays(name)
        assert trimesh.Trimesh(v, f, process=False).volume < 0  # file order stays clockwise
