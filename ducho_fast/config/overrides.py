"""Command-line overrides: ``--set a.b.c=VALUE`` and Ducho's own ``--a.b.c=VALUE``.

Values are YAML-typed (``64`` is an int, ``[224, 224]`` a list, ``true`` a bool); path parts
that are integers index lists (``textual.items.model.0.batch_size=64``).
"""

from __future__ import annotations

from typing import Any

import yaml

from ducho_fast.config.unique_keys import DuplicateKey, load_unique
from ducho_fast.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=VALUE`` (leading ``--`` allowed) into a key path and a typed value."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}' has no '='. Write it as a.b.c=VALUE.")
    dotted, raw_value = body.split("=", 1)
    parts = [p for p in dotted.strip().split(".")]
    if not dotted.strip() or any(not p for p in parts):
        raise ConfigError(f"override '{text}' has an empty key. Write it as a.b.c=VALUE.")
    try:
        value = load_unique(raw_value) if raw_value.strip() else ""
    except DuplicateKey as e:
        raise ConfigError(f"override '{text}': {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e}).") from e
    return _merge_space_keys(parts), value


def _merge_space_keys(parts: list[str]) -> list[str]:
    # Ducho's only key with a space is "gpu list"; `--set gpu_list=0` is accepted for it.
    return ["gpu list" if p == "gpu_list" else p for p in parts]


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Set one override in ``raw`` in place, creating mappings on the way."""
    path, value = parse_override(text)
    node: Any = raw
    for depth, part in enumerate(path[:-1]):
        if _is_index(path[depth + 1]) and isinstance(node, dict):
            _check_indexable(node.get(part), path[: depth + 2], text)
        node = _step(node, part, path[: depth + 1], create=True, text=text)
    last = path[-1]
    if isinstance(node, list):
        index = _index(node, last, path, text)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise _not_a_mapping(text, path)


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit()


def _check_indexable(found: Any, where: list[str], text: str) -> None:
    """An index into a key the config does not hold as a list would make a mapping with the
    index as its key (``{'0': ...}``), which then reads as a misspelt key."""
    parent, index = ".".join(where[:-1]), where[-1]
    if found is None:
        raise ConfigError(
            f"override '{text}': the config has no '{parent}' list to index with {index}; an "
            "override changes an entry of a list, it does not make one. Add the entry to the "
            "config file."
        )
    if isinstance(found, dict):
        raise ConfigError(
            f"override '{text}': '{parent}' is a mapping, not a list; leave out the index "
            f"({parent}.KEY=VALUE)."
        )


def _not_a_mapping(text: str, where: list[str]) -> ConfigError:
    parent = ".".join(where[:-1])
    return ConfigError(
        f"override '{text}': '{parent}' is a value, not a mapping or list; set it whole "
        f"({parent}=VALUE)."
    )


def _step(node: Any, part: str, where: list[str], *, create: bool, text: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where, text)]
    if not isinstance(node, dict):
        raise _not_a_mapping(text, where)
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"override '{text}': no key '{'.'.join(where)}'.")
        node[part] = {}
    return node[part]


def _index(node: list[Any], part: str, where: list[str], text: str) -> int:
    try:
        index = int(part)
    except ValueError as e:
        raise ConfigError(
            f"override '{text}': '{'.'.join(where[:-1])}' is a list; use an index, not '{part}'."
        ) from e
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"override '{text}': index {index} is out of range; "
            f"'{'.'.join(where[:-1])}' has {len(node)} entries."
        )
    return index
