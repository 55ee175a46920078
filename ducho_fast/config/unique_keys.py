"""YAML as configs are read: ``safe_load``'s loader, with a key given twice in one mapping
refused instead of the last kept silently."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a config."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``safe_load``'s loader, refusing a key given twice in one mapping. YAML keeps the last
    silently: a second ``visual:`` block would drop the whole first one. A key after a merge
    (``<<: *defaults``) still overrides the merged one, as YAML means it to."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue  # a merge, or a key YAML's own constructor refuses
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise DuplicateKey(
                    f"key {key!r} is given twice in one mapping (lines {first[key]} and {line}): "
                    "YAML keeps only the last, so what the first holds would be ignored. Merge "
                    "the two into one."
                )
            first[key] = line
        return super().construct_mapping(node, deep)


def load_unique(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, a key given twice in one mapping a :class:`DuplicateKey`."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
