"""Tests of align.config: typed dataclass configs loaded from YAML with overrides."""

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from align.config import (
    ConfigError,
    apply_overrides,
    changed_settings,
    check,
    dump_yaml,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    # Learning rate.
    lr: float = 1e-3
    # Optimiser name.
    name: Literal["adamw", "sgd"] = "adamw"

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")


@dataclass
class RL:
    # Completions sampled per prompt.
    group_size: int = 4
    # Optimiser settings.
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        check(
            self.group_size >= 2,
            "group_size",
            f"group size must be >= 2 for GRPO (got {self.group_size})",
        )


@dataclass
class Model:
    # Size preset.
    preset: str
    # Optional checkpoint to start from.
    path: Optional[str] = None  # noqa: UP045 - the Optional spelling is supported too


@dataclass
class Config:
    # The model.
    model: Model
    # RL settings.
    rl: RL = field(default_factory=RL)
    # Task names.
    tasks: list[str] = field(default_factory=lambda: ["add"])
    # Per-task weights.
    weights: dict[str, float] = field(default_factory=dict)
    # Random seed, or None for a fresh one.
    seed: int | None = 0
    # Anything at all.
    extra: Any = None
    # A switch.
    verbose: bool = False


def write(tmp_path, text: str, name: str = "x.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_from_dict_builds_nested_typed_config():
    cfg = from_dict(
        Config,
        {
            "model": {"preset": "student"},
            "rl": {"group_size": 8, "optim": {"lr": 1, "name": "sgd"}},
            "tasks": ["add", "sort"],
            "weights": {"add": 2},
            "seed": None,
            "extra": {"anything": [1, "x"]},
        },
    )
    assert cfg.model == Model(preset="student", path=None)
    assert cfg.rl.group_size == 8 and cfg.rl.optim.name == "sgd"
    assert cfg.rl.optim.lr == 1.0 and isinstance(cfg.rl.optim.lr, float)
    assert cfg.weights == {"add": 2.0} and isinstance(cfg.weights["add"], float)
    assert cfg.seed is None and cfg.extra == {"anything": [1, "x"]}
    assert cfg.tasks == ["add", "sort"]


def test_round_trip_save_then_load(tmp_path):
    cfg = Config(
        model=Model(preset="teacher", path="runs/m"),
        rl=RL(group_size=16, optim=Optim(lr=2.5e-6, name="sgd")),
        tasks=["sort", "3"],
        weights={"sort": 0.5},
        seed=None,
        extra={"k": [1, 2]},
        verbose=True,
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Config, path) == cfg
    assert to_dict(load_config(Config, path)) == to_dict(cfg)
    assert dump_yaml(cfg).splitlines()[0] == "model:"  # declaration order, not sorted
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_exponent_float_without_dot_is_accepted(tmp_path):
    # PyYAML reads `1e-5` as a string; float fields accept it, other strings stay errors.
    cfg = load_config(Config, write(tmp_path, "model: {preset: s}\nrl: {optim: {lr: 1e-5}}\n"))
    assert cfg.rl.optim.lr == 1e-5


def test_overrides_nested_keys_and_types(tmp_path):
    path = write(tmp_path, "model: {preset: student}\nrl: {group_size: 4}\n")
    cfg = load_config(
        Config,
        path,
        [
            "rl.optim.lr=0.1",
            "rl.group_size=3",
            "tasks=[a, b]",
            "seed=null",
            "verbose=true",
            "model.path=",
        ],
    )
    assert cfg.rl.optim.lr == 0.1 and cfg.rl.group_size == 3
    assert cfg.tasks == ["a", "b"] and cfg.seed is None and cfg.verbose is True
    assert cfg.model.path == ""


def test_apply_overrides_creates_dicts_and_does_not_mutate():
    data = {"rl": {"group_size": 4}}
    out = apply_overrides(data, ["rl.optim.lr=3", "model.preset=teacher"])
    assert out == {"rl": {"group_size": 4, "optim": {"lr": 3}}, "model": {"preset": "teacher"}}
    assert data == {"rl": {"group_size": 4}}


def test_load_config_without_file_uses_overrides_only():
    cfg = load_config(Config, None, ["model.preset=student"])
    assert cfg.model.preset == "student" and cfg.rl == RL()


@pytest.mark.parametrize("override", ["rl.group_size", "=3", "rl..x=1", ".a=1"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="malformed override") as info:
        apply_overrides({}, [override])
    assert repr(override) in str(info.value)


def test_unknown_key_suggests_close_match(tmp_path):
    path = write(tmp_path, "model: {presett: student}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    message = str(info.value)
    assert "unknown key 'model.presett'" in message
    assert "did you mean 'model.preset'?" in message
    assert path in message


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"model": {"preset": "s"}, "zzzzzz": 1}, source="f.yaml")
    message = str(info.value)
    assert "unknown key 'zzzzzz' in f.yaml" in message
    assert "valid keys: model, rl, tasks, weights, seed, extra, verbose" in message


def test_unknown_override_key_names_command_line(tmp_path):
    path = write(tmp_path, "model: {preset: student}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, ["rl.grop_size=3"])
    message = str(info.value)
    assert "unknown key 'rl.grop_size' in <command line>" in message
    assert "did you mean 'rl.group_size'?" in message
    assert path not in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "model: {preset: s}\nrl:\n  optim:\n    lr: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"key 'rl.optim.lr' in {path} expects float, got str 'abc'"


def test_wrong_type_in_list_and_non_mapping():
    with pytest.raises(ConfigError, match=r"key 'tasks\[1\]' in <config> expects str, got int 3"):
        from_dict(Config, {"model": {"preset": "s"}, "tasks": ["a", 3]})
    with pytest.raises(
        ConfigError, match=r"key 'rl' in <config> expects a mapping \(RL\), got int 5"
    ):
        from_dict(Config, {"model": {"preset": "s"}, "rl": 5})
    with pytest.raises(ConfigError, match="expects a mapping"):
        from_dict(Config, ["model"])
    with pytest.raises(ConfigError, match="key 'seed' in <config> expects int, got str 'x'"):
        from_dict(Config, {"model": {"preset": "s"}, "seed": "x"})


def test_bool_rejected_for_int_and_float():
    with pytest.raises(
        ConfigError, match="key 'rl.group_size' in <config> expects int, got bool True"
    ):
        from_dict(Config, {"model": {"preset": "s"}, "rl": {"group_size": True}})
    with pytest.raises(ConfigError, match="key 'rl.optim.lr' in <config> expects float, got bool"):
        from_dict(Config, {"model": {"preset": "s"}, "rl": {"optim": {"lr": False}}})


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "model: {path: x}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"missing required key 'model.preset' in {path}"


def test_literal_error_names_allowed_values():
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"model": {"preset": "s"}, "rl": {"optim": {"name": "adam"}}}, "f.yaml")
    assert (
        str(info.value) == "key 'rl.optim.name' in f.yaml must be one of 'adamw', 'sgd'; got 'adam'"
    )


def test_validate_error_has_full_path_and_file(tmp_path):
    path = write(tmp_path, "model: {preset: s}\nrl: {optim: {lr: -1.0}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == f"invalid value for 'rl.optim.lr' in {path}: must be > 0 (got -1.0)"

    path = write(tmp_path, "model: {preset: s}\nrl: {group_size: 1}\n", "y.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert str(info.value) == (
        f"invalid value for 'rl.group_size' in {path}: group size must be >= 2 for GRPO (got 1)"
    )


def test_validate_error_from_override_names_command_line(tmp_path):
    path = write(tmp_path, "model: {preset: s}\n")
    with pytest.raises(ConfigError, match=r"invalid value for 'rl.group_size' in <command line>"):
        load_config(Config, path, ["rl.group_size=1"])


def test_validate_in_list_of_dataclasses():
    @dataclass
    class Holder:
        # Optimisers.
        items: list[Optim] = field(default_factory=list)

    with pytest.raises(ConfigError, match=r"invalid value for 'items\[1\].lr' in <config>"):
        from_dict(Holder, {"items": [{"lr": 1}, {"lr": 0}]})


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert path in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  preset: [a, b\nrl: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    message = str(info.value)
    assert path in message and ", line " in message


def test_top_level_not_a_mapping_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Config, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(Config, write(tmp_path, "", "empty.yaml"))


def test_future_annotations_dataclass(tmp_path, monkeypatch):
    (tmp_path / "future_cfg_mod.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass, field\n"
        "from typing import Literal\n\n"
        "@dataclass\n"
        "class Inner:\n"
        "    mode: Literal['a', 'b'] = 'a'\n"
        "    rate: float = 1.0\n\n"
        "@dataclass\n"
        "class Outer:\n"
        "    inner: Inner = field(default_factory=Inner)\n"
        "    sizes: list[int] | None = None\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    module = importlib.import_module("future_cfg_mod")
    try:
        cfg = from_dict(module.Outer, {"inner": {"mode": "b", "rate": 2}, "sizes": [1, 2]})
        assert cfg == module.Outer(inner=module.Inner(mode="b", rate=2.0), sizes=[1, 2])
        assert isinstance(cfg.inner.rate, float)
        with pytest.raises(ConfigError, match=r"key 'sizes\[0\]' in <config> expects int"):
            from_dict(module.Outer, {"sizes": ["x"]})
    finally:
        sys.modules.pop("future_cfg_mod", None)


def test_a_setting_added_since_a_config_was_saved_is_a_change_only_off_its_default():
    config = Config(model=Model(preset="tiny"), rl=RL(group_size=8))
    saved = to_dict(config)
    # As a version without `rl.optim.name` and `verbose` saved it.
    del saved["rl"]["optim"]["name"], saved["verbose"]
    assert changed_settings(saved, config) == []
    config.rl.optim.name, config.verbose = "sgd", True
    assert changed_settings(saved, config) == ["rl.optim.name", "verbose"]
    config.rl.optim.name, config.verbose = "adamw", False
    config.rl.group_size = 4  # a setting that was saved compares as before
    assert changed_settings(saved, config) == ["rl.group_size"]
    del saved["rl"]  # a whole new section at its defaults (RL() has group_size 4)
    assert changed_settings(saved, config) == []


def test_overrides_index_into_lists():
    data = {"filters": [{"name": "a", "keep": {"max": 1}}, {"name": "b"}]}
    result = apply_overrides(data, ["filters.1.keep.drop_lowest=0.3", "filters.0.keep.max=0.5"])
    assert result["filters"] == [
        {"name": "a", "keep": {"max": 0.5}},
        {"name": "b", "keep": {"drop_lowest": 0.3}},
    ]
    assert data["filters"][1] == {"name": "b"}
    with pytest.raises(ConfigError, match="'filters' is a list of 2; '2' is not an index"):
        apply_overrides(data, ["filters.2.name=c"])
    with pytest.raises(ConfigError, match="'filters.0.name' is not a mapping"):
        apply_overrides(data, ["filters.0.name.x=c"])
