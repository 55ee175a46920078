from __future__ import annotations

from typing import Any

import pytest

from ducho_fast.config import load_config
from ducho_fast.config.overrides import apply_override, parse_override
from ducho_fast.errors import ConfigError

BASE = {
    "textual": {
        "items": {
            "input_path": "d.tsv",
            "output_path": "o",
            "model": [
                {"model_name": "a", "backend": "transformers"},
                {"model_name": "b", "backend": "transformers"},
            ],
        }
    }
}


def test_values_are_yaml_typed() -> None:
    assert parse_override("a.b=64") == (["a", "b"], 64)
    assert parse_override("--a.b=[224, 224]") == (["a", "b"], [224, 224])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello world") == (["a"], "hello world")


def test_set_with_list_index_reaches_the_model_entry() -> None:
    cfg = load_config(BASE, ["textual.items.model.1.batch_size=64"])
    assert [m.batch_size for m in cfg.models()] == [32, 64]


def test_ducho_double_dash_form() -> None:
    cfg = load_config(BASE, ["--textual.items.output_path=elsewhere"])
    assert cfg.jobs[0].output_path.name == "elsewhere"


def test_override_creates_missing_sections() -> None:
    cfg = load_config(BASE, ["runtime.threads=3", "gpu_list=-1"])
    assert cfg.runtime.threads == 3
    assert cfg.runtime.device == "cpu"
    nested: dict[str, Any] = {"a": [[1, 2], [3]]}  # lists of lists are indexed as they are
    apply_override(nested, "a.0.1=9")
    assert nested == {"a": [[1, 9], [3]]}


def test_overridden_values_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'runtime.thread'"):
        load_config(BASE, ["runtime.thread=3"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.b", "has no '='"),
        ("a..b=1", "empty key"),
        ("textual.items.model.5.batch_size=1", "index 5 is out of range"),
        ("textual.items.model.x=1", "is a list; use an index"),
        ("a=[1, 2", r"the value is not valid YAML \(while parsing a flow sequence"),
        (
            "textual.items.input_path.visual=images",
            r"'textual.items.input_path' is a value, not a mapping or list; set it whole "
            r"\(textual.items.input_path=VALUE\)",
        ),
        (
            "textual.items.input_path.visual.x=1",
            r"'textual.items.input_path' is a value, not a mapping or list",
        ),
        (  # it made {'0': {...}}, reported as the unknown key 'visual.items.model.0.0'
            "visual.items.model.0.batch_size=3",
            r"the config has no 'visual.items.model' list to index with 0; an override changes "
            r"an entry of a list, it does not make one",
        ),
        ("textual.items.reshape.0=224", r"no 'textual.items.reshape' list to index with 0"),
        ("runtime={threads: 1, threads: 2}", r"^override 'runtime=.*': key 'threads' is given tw"),
        (
            "textual.items.0.model=x",
            r"'textual.items' is a mapping, not a list; leave out the index "
            r"\(textual.items.KEY=VALUE\)",
        ),
    ],
)
def test_bad_overrides(text: str, message: str) -> None:
    raw: dict[str, Any] = {"textual": {"items": {"model": [{}], "input_path": "d.tsv"}}}
    with pytest.raises(ConfigError, match=message):
        apply_override(raw, text)


def test_overrides_are_not_dropped_when_the_config_is_already_resolved() -> None:
    from ducho_fast.api import as_config

    config = load_config(BASE)
    assert as_config(config) is config and as_config(config, []) is config
    with pytest.raises(ConfigError, match=r"\['runtime.threads=2'\] cannot apply to a Config"):
        as_config(config, ["runtime.threads=2"])  # they were ignored without a word
    assert as_config(BASE, ["runtime.threads=2"]).runtime.threads == 2
