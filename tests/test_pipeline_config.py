from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    dim: int = 8
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    path: str
    lr: float = 1e-3
    mode: Literal["exact", "resampled"] = "resampled"
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None
    flags: dict[str, bool] = field(default_factory=dict)


def test_nested_values_are_typed_and_defaults_filled():
    cfg = from_dict(Outer, {"path": "x", "lr": 1, "inner": {"names": ["a", "b"]}, "flags": {"f": True}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner == Inner(dim=8, names=["a", "b"])
    assert cfg.maybe is None and cfg.flags == {"f": True}
    assert to_dict(cfg)["inner"] == {"dim": 8, "names": ["a", "b"]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"path": "x", "lrr": 1}, "unknown key 'lrr'"),
        ({"path": "x", "inner": {"dimm": 3}}, "Outer.inner: unknown key 'dimm'"),
        ({"lr": 1}, "missing required key 'path'"),
        ({"path": "x", "lr": "fast"}, "Outer.lr: expected a number, got 'fast'"),
        ({"path": "x", "inner": {"dim": 2.5}}, "Outer.inner.dim: expected an integer"),
        ({"path": "x", "inner": {"dim": True}}, "Outer.inner.dim: expected an integer"),
        ({"path": "x", "mode": "sometimes"}, "'sometimes' is not one of ['exact', 'resampled']"),
        ({"path": "x", "inner": {"names": "a"}}, "Outer.inner.names: expected a list"),
        ({"path": "x", "maybe": "three"}, "Outer.maybe: expected an integer"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert message in str(info.value)


def test_overrides_parse_yaml_scalars_and_create_sections():
    data = apply_overrides({"path": "x", "inner": {"dim": 8}}, ["inner.dim=16", "lr=3e-4", "inner.names=[a, b]"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.dim == 16 and cfg.lr == pytest.approx(3e-4) and cfg.inner.names == ["a", "b"]
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_overrides_do_not_mutate_input_and_reject_bad_syntax():
    data = {"inner": {"dim": 8}}
    apply_overrides(data, ["inner.dim=9"])
    assert data == {"inner": {"dim": 8}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(data, ["inner.dim"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(data, ["inner.dim.x=1"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(listy)
    python_tag = tmp_path / "tag.yaml"
    python_tag.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_yaml(python_tag)
