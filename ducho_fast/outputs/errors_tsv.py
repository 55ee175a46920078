"""``ducho-fast.errors.tsv``: the items a run could not embed or fuse, beside its outputs.

One file may be written by several writers: the jobs of one config whose blocks share an
``output_path``, runs of other configs (other models) into the same folder, fusions whose
output is that folder. Each row names its job, so each writer replaces only the rows of its
own job and stages, where they stood, and keeps the others: no run's failures are lost to
another that writes the file later. The read, merge and write run under a lock, so writers
at the same moment (other processes, hosts of a job array) do not lose each other's rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ducho_fast.data.items import ItemError
from ducho_fast.outputs.atomic import write_text
from ducho_fast.outputs.lock import lock_file, unlock_file

COLUMNS = ("stage", "item_id", "origin", "reason", "job")
LOCK_FILE = ".ducho-fast.errors.lock"


def update_errors(
    path: Path, job: str, stages: Iterable[str], rows: Sequence[tuple[str, ItemError]]
) -> None:
    """Put ``rows`` (stage, error) of ``job`` in ``path``: they replace that job's rows of
    ``stages`` (every stage it ran, failures or not), the other rows stay. A file left with
    no rows is removed. Rows of a ducho-fast version that wrote no job column are dropped:
    their runs rewrote the whole file, and the next run of their job lists them again.
    """
    replaced = {(_cell(stage), _cell(job)) for stage in stages}
    new = [_line(stage, error, job) for stage, error in rows]
    if not new and not path.parent.is_dir():
        return  # nothing to write, nothing to remove
    with _locked(path.parent):
        lines: list[str] = []
        placed = False
        for line in _rows(path):
            owner = _owner(line)
            if owner is None:
                continue
            if owner not in replaced:
                lines.append(line)
            elif not placed:  # the new rows stand where this job's rows stood
                lines += new
                placed = True
        if not placed:
            lines += new
        if lines:
            write_text(path, "\n".join(["\t".join(COLUMNS), *lines]) + "\n")
        else:
            path.unlink(missing_ok=True)


def _line(stage: str, error: ItemError, job: str) -> str:
    cells = (stage, error.item_id, error.origin, error.reason, job)
    return "\t".join(_cell(c) for c in cells)


def _cell(value: str) -> str:
    # Escaped, not replaced: an id with a tab or newline stays recognisable in the report.
    return value.encode("unicode_escape").decode("ascii")


def _rows(path: Path) -> list[str]:
    """The rows of ``path`` (header left out); none if it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines()[1:] if line]


def _owner(line: str) -> tuple[str, str] | None:
    """(stage, job) of a row as written; None for a row without a job column (an earlier
    version's)."""
    cells = line.split("\t")
    return (cells[0], cells[4]) if len(cells) == len(COLUMNS) else None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder``'s errors file for one update (waits for another)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        if fd is not None:  # None: a file system without locks, unlocked as before
            unlock_file(fd, path)
