from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from convcli.errors import UsageError
from convcli.settings import build, field_docs, merge, to_yaml


@dataclass
class Example:
    lr: float = 1e-3
    """Peak learning rate."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    data: Path | None = None
    """Where the data is."""


def test_yaml_is_commented_and_round_trips(tmp_path):
    text = to_yaml(Example(lr=0.5, data=Path("x")))
    assert "# Peak learning rate.\nlr: 0.5" in text
    assert field_docs(Example)["mode"] == "Which mode."
    (tmp_path / "c.yaml").write_text(text)
    assert merge(Example, tmp_path / "c.yaml", {}) == Example(lr=0.5, data=Path("x"))


def test_flags_beat_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"lr": 0.5, "mode": "b"}))
    assert merge(Example, tmp_path / "c.yaml", {"lr": 0.1}) == Example(lr=0.1, mode="b")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "fast"}, "lr: expected float"),
        ({"mode": "c"}, "mode: 'c' is not one of a, b"),
        ({"nope": 1}, "unknown option"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(UsageError, match=message):
        build(Example, values, "c.yaml")


def test_bad_yaml_names_the_line(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1\nmode: [\n")
    with pytest.raises(UsageError, match=r"c\.yaml:\d+: invalid YAML"):
        merge(Example, tmp_path / "c.yaml", {})
