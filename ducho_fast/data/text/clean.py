"""Ducho's ``clear_text`` rules, reproduced exactly (its features depend on them).

Ducho ends with ``sample.strip().lower()`` and discards the result, so its cleaned text keeps
its case and its outer spaces; so does this one.
"""

from __future__ import annotations

import re

_SUBS: list[tuple[str, str]] = [
    (r"[^A-Za-z0-9',.!;?()]", " "),
    (r"\.", " . "),
    (r"!+", " ! "),
    (r",", " , "),
    (r";", " ; "),
    (r"\\", " \\\\ "),
    (r"!", " ! "),
    (r"\(", " ( "),
    (r"\)", " ) "),
    (r"\?", " ? "),
    (r"\s{2,}", " "),
    (r"(\.|\s){7,}", " ... "),
]
_CONTRACTIONS = ["'s", "'ve", "n't", "'re", "'d", "'m", "'ll"]
_STRAY_QUOTE = (
    r"(?!(('(?=s\b))|('(?=ve\b))|('(?=re\b))|('(?=d\b))|('(?=ll\b))|('(?=m\b))"
    r"|((?<=n\b)'(?=t\b))))'"
)
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def clear_text(sample: str) -> str:
    for pattern, repl in _SUBS:
        sample = re.sub(pattern, repl, sample)
    sample = re.sub(r"(?<= )(\w \. )+(\w \.)", lambda m: m.group().replace(" ", ""), sample)
    for c in _CONTRACTIONS:
        sample = re.sub(c.replace("'", r"\'"), " " + c, sample)
    sample = re.sub(_STRAY_QUOTE, " ", sample)
    for digit, word in enumerate(_DIGITS):
        sample = re.sub(f" {digit} ", f" {word} ", sample)
    return re.sub(r"\s{2,}", " ", sample)
