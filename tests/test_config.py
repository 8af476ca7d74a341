"""Strict config loading: unknown keys, type mismatches, YAML quirks, --a.b=c overrides, run records."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import pytest

from d3s2.config import (
    ConfigError,
    Override,
    TrainConfig,
    apply_overrides,
    from_dict,
    keys_of,
    load_yaml,
    parse_overrides,
    resolve_config_path,
    to_dict,
    write_run_record,
)


@dataclasses.dataclass(kw_only=True)
class Inner:
    width: int = 4
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass(kw_only=True)
class Outer:
    name: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    flags: list[bool] = dataclasses.field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.99)
    note: str | None = None
    use_x: bool = False


def test_valid_nested_and_defaults():
    cfg = from_dict(Outer, {"name": "n", "inner": {"width": 8, "scale": 2}, "betas": [0.5, 0.6], "flags": [True]})
    assert cfg.inner == Inner(width=8, scale=2.0, mode="a")
    assert isinstance(cfg.inner.scale, float)  # an int is accepted where a float is expected
    assert cfg.betas == (0.5, 0.6) and cfg.flags == [True] and cfg.note is None
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"name": "n", "widht": 3}, "unknown key widht; Outer accepts: name, inner"),
    ({"name": "n", "inner": {"widht": 3}}, "unknown key inner.widht; inner accepts: width, scale, mode"),
    ({"name": "n", "inner": {"width": "3"}}, "inner.width: expected int, got str ('3')"),
    ({"name": "n", "inner": {"width": 3.5}}, "inner.width: expected int, got float"),
    ({"name": "n", "inner": {"width": True}}, "inner.width: expected int, got bool"),
    ({"name": "n", "use_x": 1}, "use_x: expected bool, got int"),
    ({"name": "n", "inner": {"mode": "c"}}, "inner.mode: expected one of ['a', 'b'], got 'c'"),
    ({"name": "n", "betas": [0.1]}, "betas: expected 2 items, got 1"),
    ({"name": "n", "flags": [True, "no"]}, "flags[1]: expected bool, got str"),
    ({"name": "n", "inner": 3}, "inner: expected a mapping for Inner, got int"),
    ({"name": 5}, "name: expected str, got int"),
    ({}, "missing required key name (str)"),
])
def test_rejects_bad_configs_with_path(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


def test_yaml_reads_exponent_floats_and_rejects_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nbig: 2E+3\nname: 1e\n")
    assert load_yaml(path) == {"lr": 1e-4, "big": 2000.0, "name": "1e"}
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'a' at line 3"):
        load_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")


def test_overrides_are_typed_by_the_schema():
    data = {"name": "n", "inner": {"width": 4}}
    ov = parse_overrides(["--inner.width=16", "--inner.scale=1e-3", "--name=123", "--betas=[0.8, 0.95]",
                          "--note=null", "--use_x=true", "inner.mode=b"])
    cfg = from_dict(Outer, apply_overrides(data, ov))
    assert cfg.inner.width == 16 and cfg.inner.scale == 1e-3 and cfg.inner.mode == "b"
    assert cfg.name == "123"  # a str field keeps the raw text
    assert cfg.betas == (0.8, 0.95) and cfg.note is None and cfg.use_x is True
    assert data == {"name": "n", "inner": {"width": 4}}  # the input is not modified


def test_override_errors():
    with pytest.raises(ConfigError, match=r"inner.width \(from --inner.width=ten\): expected int, got str"):
        from_dict(Outer, apply_overrides({"name": "n"}, parse_overrides(["--inner.width=ten"])))
    with pytest.raises(ConfigError, match=r"unknown key inner.depth \(from --inner.depth=2\); inner accepts"):
        from_dict(Outer, apply_overrides({"name": "n"}, parse_overrides(["--inner.depth=2"])))
    with pytest.raises(ConfigError, match=r"unknown key outer \(from --outer.x.y=1\); Outer accepts"):
        from_dict(Outer, apply_overrides({"name": "n"}, parse_overrides(["--outer.x.y=1"])))
    with pytest.raises(ConfigError, match=r"unknown key widht; Outer"):  # from the file: no override to name
        from_dict(Outer, apply_overrides({"name": "n", "widht": 1}, parse_overrides(["--name=m"])))
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides({"name": "n"}, parse_overrides(["--name.x=2"]))
    for bad in ["--inner.width", "--=3", "--a..b=1", "--1a=2"]:
        with pytest.raises(ConfigError, match="expected an override of the form"):
            parse_overrides([bad])


@dataclasses.dataclass(kw_only=True)
class WithOverrides:
    inner_args: dict = keys_of(lambda: Outer)  # some keys of an Outer, merged elsewhere


@pytest.mark.parametrize("overrides, message", [
    (["--inner_args.widht=3"], "unknown key inner_args.widht (from --inner_args.widht=3); inner_args accepts: name, "
                               "inner, flags, betas, note, use_x"),
    (["--inner_args.inner.depth=2"], "unknown key inner_args.inner.depth (from --inner_args.inner.depth=2); "
                                     "inner_args.inner accepts: width, scale, mode"),
    (["--inner_args.use_x=maybe"], "inner_args.use_x (from --inner_args.use_x=maybe): expected bool, got str"),
    (["--inner_args={widht: 3}"], "unknown key inner_args.widht (from --inner_args={widht: 3}); inner_args accepts: "
                                  "name"),
])
def test_keys_of_a_config_are_checked_like_its_fields(overrides, message):
    with pytest.raises(ConfigError) as err:
        from_dict(WithOverrides, apply_overrides({}, parse_overrides(overrides)))
    assert message in str(err.value)


def test_keys_of_a_config_keep_their_plain_values():
    ov = parse_overrides(["--inner_args.inner.width=8", "--inner_args.betas=[0.5, 0.6]"])
    # a subset: the required "name" may come from elsewhere; values stay plain data for the merge
    assert from_dict(WithOverrides, apply_overrides({}, ov)).inner_args == {"inner": {"width": 8}, "betas": [0.5, 0.6]}
    with pytest.raises(ConfigError, match="unknown key inner_args.widht; inner_args accepts"):  # from the file
        from_dict(WithOverrides, {"inner_args": {"widht": 3}})


@pytest.mark.parametrize("override, message", [
    ("--inner={width: ten}", "inner.width (from --inner={width: ten}): expected int, got str ('ten')"),
    ("--inner={depth: 2}", "unknown key inner.depth (from --inner={depth: 2}); inner accepts: width, scale, mode"),
    ("--inner={mode: c}", "inner.mode (from --inner={mode: c}): expected one of ['a', 'b'], got 'c'"),
    ("--inner=3", "inner (from --inner=3): expected a mapping for Inner, got int"),
    ("--betas=[0.1, x]", "betas[1] (from --betas=[0.1, x]): expected float, got str ('x')"),
    ("--flags=[true, {a: 1}]", "flags[1] (from --flags=[true, {a: 1}]): expected bool, got dict"),
    ("--inner_args={inner: {depth: 2}}", "unknown key inner_args.inner.depth (from --inner_args={inner: {depth: 2}}); "
                                         "inner_args.inner accepts: width, scale, mode"),
    ("--inner_args.inner={width: ten}", "inner_args.inner.width (from --inner_args.inner={width: ten}): expected "
                                        "int, got str ('ten')"),
])
def test_errors_inside_a_section_or_list_given_whole_name_its_override(override, message):
    @dataclasses.dataclass(kw_only=True)
    class Both(Outer):
        inner_args: dict = keys_of(lambda: Outer)

    with pytest.raises(ConfigError) as err:
        from_dict(Both, apply_overrides({"name": "n", "inner": {"width": 2}}, parse_overrides([override])))
    assert message in str(err.value)


def test_whole_train_sections_name_their_override():
    base = {"task": {"name": "toy"}, "train": {"max_steps": 10}, "optim": {"lr": 1e-3}}
    with pytest.raises(ConfigError, match=r"^optim \(from --optim=\{lr: -1\}\): need lr > 0"):  # __post_init__'s
        from_dict(TrainConfig, apply_overrides(base, parse_overrides(["--optim={lr: -1}"])))
    with pytest.raises(ConfigError, match=r"^missing required key train.max_steps \(int\), not in --train="):
        from_dict(TrainConfig, apply_overrides(base, parse_overrides(["--train={log_every: 2}"])))
    cfg = from_dict(TrainConfig, apply_overrides(base, parse_overrides(["--optim={warmup_steps: 5}"])))
    assert cfg.optim.warmup_steps == 5 and cfg.optim.lr == 1e-4  # the section given whole replaces the file's


@pytest.mark.parametrize("overrides", [["--inner.width=2", "--inner={scale: 2}"],
                                       ["--inner={scale: 2}", "--inner.width=2"]])
def test_a_key_inside_a_section_given_whole_is_an_error_in_either_order(overrides):
    # the later one would silently drop the other
    with pytest.raises(ConfigError, match="expected one of the two") as err:
        apply_overrides({"name": "n"}, parse_overrides(overrides))
    assert all(override in str(err.value) for override in overrides)


@dataclasses.dataclass(kw_only=True)
class Sized:
    size: int  # required
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@dataclasses.dataclass(kw_only=True)
class Model:
    sized: Sized = dataclasses.field(default_factory=lambda: Sized(size=4))
    depth: int = 2
    widths: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(kw_only=True)
class ModelOverrides:
    model_args: dict = keys_of(lambda: Model)


def test_keys_of_checks_a_nested_section_as_a_subset():
    # merge_args sets the section key by key, so its other keys (the required size) come from the model's config
    ov = parse_overrides(["--model_args.sized.scale=0.5"])
    assert from_dict(ModelOverrides, apply_overrides({}, ov)).model_args == {"sized": {"scale": 0.5}}
    assert from_dict(ModelOverrides, {"model_args": {"sized": {"scale": 0.5}}}).model_args == {"sized": {"scale": 0.5}}
    with pytest.raises(ConfigError, match=r"unknown key model_args.sized.scael \(from --model_args.sized.scael=1\); "
                                          "model_args.sized accepts: size, scale"):
        from_dict(ModelOverrides, apply_overrides({}, parse_overrides(["--model_args.sized.scael=1"])))
    with pytest.raises(ConfigError, match=r"model_args.sized.scale \(from --model_args.sized.scale=big\): expected "
                                          "float, got str"):
        from_dict(ModelOverrides, apply_overrides({}, parse_overrides(["--model_args.sized.scale=big"])))
    with pytest.raises(ConfigError, match=r"model_args.sized \(from --model_args.sized=4\): expected a mapping"):
        from_dict(ModelOverrides, apply_overrides({}, parse_overrides(["--model_args.sized=4"])))


def test_merge_args_merges_nested_sections_key_by_key():
    from d3s2.config import merge_args

    base = {"depth": 2, "sized": {"size": 4, "scale": 1.0}, "widths": [1, 2]}
    merged = merge_args(base, {"sized": {"scale": 0.5}, "widths": [3], "depth": 3})
    assert merged == {"depth": 3, "sized": {"size": 4, "scale": 0.5}, "widths": [3]}  # a list replaces base's
    assert base == {"depth": 2, "sized": {"size": 4, "scale": 1.0}, "widths": [1, 2]}  # the inputs are not modified
    assert merge_args({}, {"sized": {"scale": 0.5}}) == {"sized": {"scale": 0.5}}
    assert merge_args({"sized": None}, {"sized": {"scale": 0.5}}) == {"sized": {"scale": 0.5}}
    assert from_dict(Model, merged).sized == Sized(size=4, scale=0.5)


def test_train_config_schema_checks():
    base = {"task": {"name": "toy"}, "train": {"max_steps": 10}}
    cfg = from_dict(TrainConfig, base)
    assert cfg.optim.betas == (0.9, 0.999) and cfg.data.micro_batches_per_step == 1
    with pytest.raises(ConfigError, match="train: max_steps, log_every and keep_last must be >= 1"):
        from_dict(TrainConfig, {**base, "train": {"max_steps": 0}})
    with pytest.raises(ConfigError, match="ema.decay must be in"):
        from_dict(TrainConfig, {**base, "ema": {"decay": 1.0}})
    with pytest.raises(ConfigError, match="train.parallel: expected one of"):
        from_dict(TrainConfig, {**base, "train": {"max_steps": 3, "parallel": "tp"}})
    for grace in (0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="stop_grace_s must be a finite number of seconds > 0, got"):
            from_dict(TrainConfig, {**base, "train": {"max_steps": 3, "stop_grace_s": grace}})


def test_run_record(tmp_path):
    cfg = from_dict(Outer, {"name": "n"})
    write_run_record(tmp_path, cfg, command=["d3s2", "train", "toy"], seed=7, extra={"world_size": 2})
    assert load_yaml(tmp_path / "config.yaml")["inner"]["width"] == 4
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["command"] == ["d3s2", "train", "toy"] and record["seed"] == 7 and record["world_size"] == 2
    assert set(record["git"]) == {"commit", "dirty"}
    assert not list(tmp_path.glob(".*tmp"))


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged copies are used
    train = load_yaml("configs/debug/tiny_vae_train.yaml")
    model = load_yaml(train["task"]["args"]["model_config"])  # a configs/... path inside a config
    assert model["model"]["name"] == "sparse_sdf_vae"
    (tmp_path / "configs" / "debug").mkdir(parents=True)
    (tmp_path / "configs" / "debug" / "tiny_vae.yaml").write_text("model: {name: mine}\n")
    assert load_yaml("configs/debug/tiny_vae.yaml") == {"model": {"name": "mine"}}  # a local file wins
    with pytest.raises(FileNotFoundError, match="nor as .*packaged configs"):
        load_yaml("configs/debug/missing.yaml")


_CONFIG_PATH = re.compile(r"configs/[\w./-]+\.yaml")
_REPO = Path(__file__).resolve().parents[1]


def test_configs_named_in_the_train_help_and_docs_exist(tmp_path, monkeypatch, capsys):
    from d3s2.cli import main
    from d3s2.train import trainer

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    texts = {"d3s2 train --help": capsys.readouterr().out, "d3s2.train.trainer": trainer.__doc__ or ""}
    # README and docs/ when run from a checkout (an sdist carries tests/ but not docs/).
    for doc in [_REPO / "README.md", *sorted((_REPO / "docs").glob("*.md"))]:
        if doc.is_file():
            texts[doc.name] = doc.read_text()
    monkeypatch.chdir(tmp_path)  # as a user after pip install: configs/... must be a packaged config
    named = {(where, path) for where, text in texts.items() for path in _CONFIG_PATH.findall(text)}
    assert any(where == "d3s2 train --help" for where, _ in named)
    missing = []
    for where, path in sorted(named):
        try:
            resolve_config_path(path)
        except FileNotFoundError:
            missing.append(f"{where}: {path}")
    assert not missing, f"configs named but not shipped: {missing}"


def test_train_config_yaml_errors_name_the_file_once(tmp_path):
    from d3s2.train.trainer import load_train_config

    path = tmp_path / "bad.yaml"
    path.write_text("a: [\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(err.value).startswith(f"{path}: invalid YAML")  # not "bad.yaml: bad.yaml: ..."


def test_errors_name_what_the_user_typed_for_an_override():
    # A command's own option for a config key (d3s2 train's --max-steps N): its errors name the option.
    width = Override("inner.width", "ten", "--width ten")
    with pytest.raises(ConfigError, match=r"inner.width \(from --width ten\): expected int, got str"):
        from_dict(Outer, apply_overrides({"name": "n"}, parse_overrides([width])))
    with pytest.raises(ConfigError, match=r"^--width ten: --inner=\{scale: 2\} already gives inner whole"):
        apply_overrides({"name": "n"}, parse_overrides(["--inner={scale: 2}", width]))


def test_an_override_given_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"^optim\.lr given twice \(--optim\.lr=1e-3 and --optim\.lr=2e-3\)"):
        parse_overrides(["--optim.lr=1e-3", "optim.lr=2e-3"])
    with pytest.raises(ConfigError, match=r"^train\.max_steps given twice \(--train\.max_steps=3 and --max-steps 5\)"):
        parse_overrides(["--train.max_steps=3", Override("train.max_steps", "5", "--max-steps 5")])
