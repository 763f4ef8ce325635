"""The small TOML writer round-trips through tomllib."""

import math
import tomllib

from lorakit.train.config_files import dumps_toml, read_toml, write_toml


def test_round_trip(tmp_path):
    data = {"a": 1, "b": 1e-4, "c": True, "d": 'C:\\path "quoted"\n\ttab', "e": ["x=1", "y=2"], "f": [0.9, 0.999],
            "g": "日本語", "h": 3.0, "skip": None, "sec": {"k": "v", "n": 2, "inline": {"z": 1}}, "weird key": 1}
    text = dumps_toml(data)
    back = tomllib.loads(text)
    want = {k: v for k, v in data.items() if v is not None}
    assert back == want
    assert isinstance(back["h"], float)
    p = tmp_path / "x.toml"
    write_toml(p, data)
    assert read_toml(p) == want


def test_special_floats():
    back = tomllib.loads(dumps_toml({"a": math.inf, "b": -math.inf}))
    assert back == {"a": math.inf, "b": -math.inf}
