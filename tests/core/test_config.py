from dataclasses import dataclass

import pytest

from pgolf.config import check, from_params, load_params, to_dict
from pgolf.errors import ParamError


@dataclass(frozen=True)
class Inner:
    bits: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class Outer:
    lr: float
    steps: int
    enabled: bool
    mode: str
    layers: tuple[int, ...]
    inner: Inner
    maybe: int | None = None

    def __post_init__(self):
        check(self.lr > 0, "lr", "must be > 0")


GOOD = {"s": {"lr": 1, "steps": 3, "enabled": True, "mode": "a", "layers": [1, 2],
              "inner": {"bits": 6, "names": ["x"]}, "maybe": None}}


def test_builds_and_coerces():
    cfg = from_params(Outer, GOOD, "s")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.layers == (1, 2) and cfg.inner.names == ("x",)
    assert to_dict(cfg)["layers"] == [1, 2]


@pytest.mark.parametrize("mutate,key,fragment", [
    (lambda d: d.update(typo=1), "s.typo", "unknown key"),
    (lambda d: d.pop("steps"), "s.steps", "missing key"),
    (lambda d: d.update(steps=1.5), "s.steps", "integer"),
    (lambda d: d.update(steps=True), "s.steps", "integer"),
    (lambda d: d.update(enabled=1), "s.enabled", "true/false"),
    (lambda d: d.update(lr=-1), "s.lr", "must be > 0"),
    (lambda d: d["inner"].update(bits="6"), "s.inner.bits", "integer"),
    (lambda d: d.update(layers=[1, "a"]), "s.layers[1]", "integer"),
])
def test_errors_name_the_key(mutate, key, fragment):
    import copy
    params = copy.deepcopy(GOOD)
    mutate(params["s"])
    with pytest.raises(ParamError) as info:
        from_params(Outer, params, "s")
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"params.yaml: {key}:")


def test_missing_section():
    with pytest.raises(ParamError, match="missing section"):
        from_params(Outer, {}, "s")


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ParamError, match="invalid YAML"):
        load_params(bad)
