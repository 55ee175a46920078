from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ducho_fast import console
from ducho_fast.cli import ITEMS_FAILED_EXIT, app
from ducho_fast.data.text import tsv
from ducho_fast.errors import DuchoError
from tests.conftest import assert_said, textual_config

runner = CliRunner()


@pytest.fixture
def text_config(tmp_path, store, texts_tsv, minilm_dir) -> Path:
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    data = textual_config(
        tmp_path,
        {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1},
        store,
    )
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_export_inspect_extract(text_config: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(text_config)])
    assert result.exit_code == 0, result.output
    assert "all-MiniLM-L6-v2" in result.output
    artifact = next(
        Path(yaml.safe_load(text_config.read_text())["store"]).glob("sentence_transformers-*")
    )
    shown = runner.invoke(app, ["inspect", str(artifact)])
    assert shown.exit_code == 0 and "passed" in shown.output and "dim 384" in shown.output
    ran = json.loads((artifact / "manifest.json").read_text())["parity"]["provider"]
    assert ran in ("CPUExecutionProvider", "CUDAExecutionProvider")  # CUDA on a GPU machine
    assert f"samples, run with {ran}: passed" in shown.output
    older = tmp_path / "older"  # exported before the provider was recorded
    shutil.copytree(artifact, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["parity"]["provider"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    shown = runner.invoke(app, ["inspect", str(older)])
    assert shown.exit_code == 0 and "samples: passed" in shown.output
    assert "[sentence-transformers " in shown.output  # the framework, not eaten as markup
    done = runner.invoke(
        app,
        [
            "extract",
            str(text_config),
            "--no-progress",
            "--set",
            "textual.items.model.0.batch_size=2",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "textual.items" in done.output and "11" in done.output
    resolved = yaml.safe_load((tmp_path / "out" / "ducho-fast.resolved.yml").read_text())
    assert resolved["textual"]["items"]["model"][0]["batch_size"] == 2
    # Again with the matrix layout: made once, then kept while no feature changes.
    matrix = ["--set", "output.layouts=[ducho, matrix]", "--no-progress"]
    made = runner.invoke(app, ["extract", str(text_config), *matrix])
    assert "matrix 11 rows ->" in made.output, made.output
    kept = runner.invoke(app, ["extract", str(text_config), *matrix])
    assert "matrix 11 rows, kept: no feature written since ->" in kept.output, kept.output


@pytest.mark.slow
def test_the_summary_says_when_the_model_waited_for_its_inputs(
    text_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from ducho_fast import console
    from ducho_fast.config.model import RuntimeOptions
    from ducho_fast.runtime import pipeline
    from ducho_fast.runtime.session import batch_lanes

    assert runner.invoke(app, ["export", str(text_config)]).exit_code == 0
    extract = ["extract", str(text_config), "--no-progress", "--fresh"]
    extract += ["--set", "textual.items.model.0.batch_size=2"]
    quick = runner.invoke(app, extract)
    assert quick.exit_code == 0, quick.output
    count = batch_lanes(RuntimeOptions())  # as extract decides: 2 on 2 CPUs, 4 on 16
    lanes = f", {count} batches at once" if count > 1 else ""
    assert re.search(
        rf"model busy \d+% of [\d.]+s{lanes} \(first batch after [\d.]+s\); then waited "
        r"[\d.]+s for inputs, [\d.]+s for the writer(, then [\d.]+s for the last writes)?; the "
        r"writer used [\d.]+s of CPU",
        quick.output,
    ), quick.output
    assert "waited for its inputs" not in quick.output
    real_prepare = pipeline.prepare

    def slow_prepare(embedder: Any, batch: Any, *rest: Any) -> Any:
        # 6 batches of 0.3 s on the readers: the model waits about 0.9 s, far above the bound
        # (0.2 s here). With 0.1 s it waited 0.15-0.25 s, and a busy machine failed the test.
        time.sleep(0.3)
        return real_prepare(embedder, batch, *rest)

    monkeypatch.setattr(pipeline, "prepare", slow_prepare)
    monkeypatch.setattr(console, "INPUT_BOUND_MIN_SECONDS", 0.2)
    assert_said(
        runner.invoke(app, extract),
        r"the model waited for its inputs \d+% of the run: reading and decoding "
        r"are slower than the model here\. More decode threads \(runtime\.workers\)",
    )


@pytest.mark.slow
def test_failed_items_give_their_own_exit_code(text_config: Path, tmp_path: Path) -> None:
    (tmp_path / "descriptions.tsv").unlink()
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\nok\tfine text\nbad\t \n")
    assert runner.invoke(app, ["export", str(text_config)]).exit_code == 0
    result = runner.invoke(app, ["extract", str(text_config), "--no-progress"])
    assert result.exit_code == ITEMS_FAILED_EXIT
    assert "1 item(s) failed" in result.output


@pytest.mark.slow
def test_a_log_gets_progress_lines_while_extract_runs(
    text_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where stderr is not a terminal (a batch job's log; CliRunner's), rich draws its bar
    only when it ends: extract prints plain lines as it goes instead."""
    assert runner.invoke(app, ["export", str(text_config)]).exit_code == 0
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.0)  # a line at every batch
    batches = ["--set", "textual.items.model.0.batch_size=2"]
    result = runner.invoke(app, ["extract", str(text_config), *batches])
    assert result.exit_code == 0, result.output
    assert "━" not in result.output  # no bar
    lines = result.output.splitlines()
    shown = [
        re.fullmatch(
            r"textual\.items all-MiniLM-L6-v2: (\d+)/11 \((\d+)%\), [\d.]+ items/s, "
            r"about \d+:\d\d:\d\d left",
            line,
        )
        for line in lines
    ]
    counts = [int(m.group(1)) for m in shown if m]
    assert shown[0] and len(counts) >= 2 and counts == sorted(counts) and counts[-1] < 11, (
        result.output
    )
    assert "11 written" in result.output


def test_progress_lines_come_at_most_every_so_often(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0, 112.0, 116.0, 125.0, 130.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    lines = console.ProgressLines("job model", 40, every=5.0)  # starts at 100 s
    for n in (10, 2, 3, 5, 20):  # at 110, 112, 116, 125 and 130 s
        lines.tick(n)
    assert printed == [  # none at the start
        "job model: 10/40 (25%), 1.0 items/s, about 0:00:30 left",
        "job model: 15/40 (38%), 0.9 items/s, about 0:00:27 left",  # 5 s after the last line
        "job model: 20/40 (50%), 0.8 items/s, about 0:00:25 left",
    ]  # none at the end: the summary line follows
    assert console.clock(3 * 3600 + 62.4) == "3:01:02"


def test_a_stall_still_gets_a_line_every_so_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tick for a while: the watcher's lines say how long nothing was done."""
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    lines = console.ProgressLines("job model", 40, every=30.0)  # starts at 100 s
    for at in (110.0, 131.0):  # before the first batch
        now[0] = at
        lines.stalled()
    now[0] = 162.0
    lines.tick(10)  # a line: 31 s since the last one, at 131 s
    for at in (180.0, 193.0, 210.0, 224.0):
        now[0] = at
        lines.stalled()
    now[0] = 225.0
    lines.tick(30)  # done: the summary line follows
    now[0] = 300.0
    lines.stalled()
    assert printed == [
        "job model: 0/40, no item done yet, 0:00:31 in",
        "job model: 10/40 (25%), 0.2 items/s, about 0:03:06 left",
        "job model: 10/40 (25%), no item done for 0:00:31",  # at 193 s
        "job model: 10/40 (25%), no item done for 0:01:02",  # at 224 s
    ]


def test_the_watcher_leaves_the_line_to_the_next_tick_while_items_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watcher wakes ``every`` seconds after the last line, a moment before the tick that
    would print the rate: it printed "no item done for 0:00:00" there, so a log of a run
    going well had that line in place of nearly every rate line."""
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    lines = console.ProgressLines("job model", 100, every=30.0)  # starts at 100 s
    for second in range(101, 161):  # an item a second, half a second after the watcher
        now[0] = second
        lines.stalled()
        now[0] = second + 0.5
        lines.tick(1)
    assert printed == [
        "job model: 30/100 (30%), 1.0 items/s, about 0:01:11 left",  # at 130.5 s
        "job model: 60/100 (60%), 1.0 items/s, about 0:00:40 left",  # at 160.5 s
    ]


def test_the_stall_watcher_prints_while_nothing_ticks_and_stops_at_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    lines = console.ProgressLines("job model", 40, every=0.05)
    lines.start()
    deadline = time.monotonic() + 10
    while len(printed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines.close()
    count = len(printed)
    time.sleep(0.2)
    assert count >= 2 and len(printed) == count, printed  # nothing after close
    assert all(re.fullmatch(r"job model: 0/40, no item done yet, 0:00:00 in", t) for t in printed)


def test_extract_progress_in_a_log_watches_for_stalls_until_its_work_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The progress extract is given where stderr is no terminal starts the watcher, and
    ends it with the work."""
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    monkeypatch.setattr(type(console.err), "is_terminal", property(lambda self: False))
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.05)
    with console.progress_display("job model", 40) as tick:
        deadline = time.monotonic() + 10
        while not printed and time.monotonic() < deadline:
            time.sleep(0.01)
        tick(1)
    count = len(printed)
    time.sleep(0.2)
    assert count >= 1 and len(printed) == count, printed
    assert printed[0] == "job model: 0/40, no item done yet, 0:00:00 in"


def _watched_log(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[float], list[str], console.Watched]:
    """A Watched writing to a log (not a terminal), its watcher not started: the clock to
    set (``now[0]``), the lines printed, and the Watched."""
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    monkeypatch.setattr(type(console.err), "is_terminal", property(lambda self: False))
    return now, printed, console.Watched("extract: checking", every=30.0)


def test_a_log_says_a_command_is_at_work_while_it_shows_no_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the first bar (listing a million files, checking an earlier run's outputs),
    between two and after the last, a line every so often says what the command is doing:
    none while a bar is shown, and the clock starts again when one ends."""
    now, printed, watched = _watched_log(monkeypatch)
    for at in (110.0, 131.0, 140.0, 161.0):
        now[0] = at
        watched.quiet()
    with watched.progress("job model", 40) as tick:
        for at in (200.0, 300.0):
            now[0] = at
            watched.quiet()  # the bar's own lines say how it goes
        tick(40)
    for at in (320.0, 331.0):
        now[0] = at
        watched.quiet()
    assert printed == [
        "extract: checking, 0:00:31 in",
        "extract: checking, 0:01:01 in",
        "extract: checking, 0:00:31 in",  # 31 s after the bar ended
    ], printed


def test_the_quiet_lines_say_what_a_long_step_is_doing(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a step says how far it got (reading a large table), the lines say it too."""
    now, printed, watched = _watched_log(monkeypatch)
    watched.status("reading t.tsv: 1.0 of 2.0 MB, 50%")
    now[0] = 131.0
    watched.quiet()
    watched.status(None)
    now[0] = 162.0
    watched.quiet()
    assert printed == [
        "extract: checking (reading t.tsv: 1.0 of 2.0 MB, 50%), 0:00:31 in",
        "extract: checking, 0:01:02 in",
    ], printed


def test_a_terminal_gets_a_spinner_while_no_bar_is_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a moment with no bar, a spinner; gone before a bar is drawn (a terminal shows
    one live display at a time) and when the command ends."""
    now = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(type(console.err), "is_terminal", property(lambda self: True))
    events: list[str] = []

    class Spinner:
        def __init__(self, text: str) -> None:
            events.append(f"show {text}")

        def start(self) -> None:
            pass

        def update(self, text: str) -> None:
            events.append(f"now {text}")

        def stop(self) -> None:
            events.append("gone")

    @contextmanager
    def bar(label: str, total: int, every: float) -> Iterator[Any]:
        events.append(f"bar {label}")
        yield lambda n: None

    monkeypatch.setattr(console.err, "status", Spinner)
    monkeypatch.setattr(console, "progress_display", bar)
    watched = console.Watched("extract: checking")
    for at in (101.0, 103.0, 105.0):
        now[0] = at
        watched.quiet()
    with watched.progress("job model", 40):
        now[0] = 200.0
        watched.quiet()
    now[0] = 201.0
    watched.quiet()  # a moment after the bar: none yet
    now[0] = 203.0
    watched.quiet()
    with watched:
        pass
    assert events == [
        "show extract: checking, 0:00:03 in",
        "now extract: checking, 0:00:05 in",
        "gone",
        "bar job model",
        "show extract: checking, 0:00:03 in",
        "gone",
    ]


@pytest.mark.slow
def test_extract_says_it_is_at_work_while_its_checks_take_long(
    text_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose checks take long (a slow file system, a large folder) says so in its
    log before any bar, and stops saying it when the command ends."""
    import ducho_fast.api

    assert runner.invoke(app, ["export", str(text_config)]).exit_code == 0
    listed = ducho_fast.api.job_items

    def slow_listing(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return listed(*args, **kwargs)

    told = tsv._told

    def slow_told(*args: Any) -> Any:  # a table read slowly, told how far every row
        for row in told(*args):
            time.sleep(0.05)
            yield row

    monkeypatch.setattr(ducho_fast.api, "job_items", slow_listing)
    monkeypatch.setattr(tsv, "_told", slow_told)
    monkeypatch.setattr(tsv, "READING_ROWS", 1)
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.1)
    monkeypatch.setattr(console, "QUIET_SPINNER_SECONDS", 0.1)
    result = runner.invoke(app, ["extract", str(text_config)])
    assert result.exit_code == 0, result.output
    said = result.output.splitlines()
    first = next(k for k, line in enumerate(said) if line.startswith("textual.items"))
    quiet = [line for line in said[:first] if line.startswith("extract: ")]
    doing = r"extract: checking inputs, artifacts and outputs"
    reading = r" \(reading descriptions\.tsv: 0\.0 of 0\.0 MB, \d+%\)"
    assert quiet and all(
        re.fullmatch(rf"{doing}({reading})?, 0:00:0\d in", line) for line in quiet
    ), said
    assert any("(reading descriptions.tsv: " in line for line in quiet), said
    assert not any("(reading" in line for line in said[first:]), said  # said no more once read
    assert not [t for t in threading.enumerate() if t.name == "ducho-quiet"]


def test_export_says_it_is_still_at_work_on_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, converting and checking a large model takes minutes: a log hears of it
    every so often, and hears no more once that model is done."""
    import ducho_fast.api

    printed: list[str] = []
    monkeypatch.setattr(console.err, "print", lambda text, **_: printed.append(text))
    monkeypatch.setattr(type(console.err), "is_terminal", property(lambda self: False))
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.05)
    spec = type("Spec", (), {"key_path": "visual.items.model.0", "model_dir": "m/resnet50"})

    def slow_export() -> list[Any]:
        deadline = time.monotonic() + 10
        while len(printed) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        return []

    monkeypatch.setattr(ducho_fast.api, "export_steps", lambda *_, **__: [(spec, slow_export)])
    config = tmp_path / "c.yml"
    config.write_text("{}\n")
    result = runner.invoke(app, ["export", str(config)])
    assert result.exit_code == 0, result.output
    count = len(printed)
    time.sleep(0.2)
    assert len(printed) == count, printed  # nothing once the model is done
    assert printed[0] == "visual.items.model.0 resnet50: exporting..."
    assert printed[1:] and all(
        line.startswith("visual.items.model.0 resnet50: exporting, 0:00:0") for line in printed[1:]
    ), printed


def test_config_error_exit_1_with_message(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("visual:\n  items:\n    input_path: i\n    output_path: o\n    modle: []\n")
    result = runner.invoke(app, ["extract", str(path)])
    assert result.exit_code == 1
    assert (
        "unknown key 'visual.items.modle'" in result.output
        and "Did you mean 'model'" in result.output
    )


def test_ducho_style_override_arguments(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(
        "textual:\n  items:\n    input_path: d.tsv\n    output_path: o\n"
        "    model: [{model_name: m, backend: transformers}]\n"
    )
    result = runner.invoke(app, ["extract", str(path), "--textual.items.model.0.batch_size=zero"])
    assert result.exit_code == 1
    assert (
        "'textual.items.model.0.batch_size' must be an integer, found a string 'zero'"
        in result.output
    )
    for stray in (["stray"], ["-o", "runtime.workers=2"], ["--runtime.workers", "2"]):
        bad = runner.invoke(app, ["extract", str(path), *stray])
        assert bad.exit_code == 2
        said = " ".join(bad.output.replace("│", " ").split())
        assert "an override is --set a.b.c=VALUE or --a.b.c=VALUE (one argument" in said, said
    for command in ("export", "extract", "fuse", "bench"):
        for option in ("-v", "--verbose", "--version"):
            placed = runner.invoke(app, [command, str(path), option])
            assert placed.exit_code == 2
            said = " ".join(placed.output.replace("│", " ").split())
            assert (
                f"{option} is an option of ducho-fast itself, not of the command: put it "
                f"before the command, as in ducho-fast {option} {command} CONFIG."
            ) in said, said


@pytest.mark.slow
def test_layers_lists_torch_and_transformers_layers(tiny_bert_dir: Path) -> None:
    result = runner.invoke(app, ["layers", "torch", "resnet18"])
    assert result.exit_code == 0 and "avgpool" in result.output and "layer4" in result.output
    result = runner.invoke(app, ["layers", "transformers", str(tiny_bert_dir)])
    assert result.exit_code == 0 and "pooler_output" in result.output
    unknown = runner.invoke(app, ["layers", "torch", "resnet5O"])
    assert unknown.exit_code == 1 and "Did you mean 'resnet50'" in unknown.output


def test_layers_takes_the_architectures_arguments(resnet18_state_dict: Path) -> None:
    base = ["layers", "torch", str(resnet18_state_dict), "--architecture", "resnet18"]
    result = runner.invoke(app, [*base, "--architecture-kwargs", "{num_classes: 1000}"])
    assert result.exit_code == 0, result.output
    assert "avgpool" in result.output.split()
    for bad in ("[1]", "{a: [", "7"):
        refused = runner.invoke(app, [*base, "--architecture-kwargs", bad])
        assert refused.exit_code == 1
        assert f"--architecture-kwargs {bad!r} is not a mapping" in refused.output
    wrong = runner.invoke(app, [*base, "--architecture-kwargs", '{"num_class": 3}'])
    assert wrong.exit_code == 1
    assert "unexpected keyword argument 'num_class'" in wrong.output


def test_layers_of_a_folder_that_is_no_transformers_model_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    result = runner.invoke(app, ["layers", "transformers", str(tmp_path)])
    assert result.exit_code == 1, result.output  # was a traceback
    assert f"cannot load the model '{tmp_path}'" in result.output
    assert "A file of that folder is missing, damaged or not what the library" in result.output


def test_a_model_or_artifact_named_past_any_file_systems_limit_is_an_error() -> None:
    """``layers`` and ``inspect`` ended in an OSError traceback (File name too long)."""
    for backend in ("torch", "transformers", "tensorflow", "sentence_transformers"):
        result = runner.invoke(app, ["layers", backend, "m" * 300])
        assert result.exit_code == 1, result.output
        assert "the MODEL of `ducho-fast layers` is 'mmm" in result.output
        assert "which no file system takes as a path" in " ".join(result.output.split())
    result = runner.invoke(app, ["inspect", "a" * 300])
    assert result.exit_code == 1, result.output
    assert f"no artifact at '{'a' * 300}': no file system takes it as a path" in " ".join(
        result.output.split()
    )


def test_doctor_reports_real_providers() -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0
    assert "CPU session runs on: CPUExecutionProvider" in result.output
    assert "CPUs this process may use:" in result.output
    assert re.search(
        r"memory this process may take: [\d.]+ GiB now .* auto: [\d.]+ GiB", result.output
    )


@pytest.mark.slow
def test_console_script_end_to_end(text_config: Path) -> None:
    script = shutil.which("ducho-fast", path=str(Path(sys.executable).parent))
    assert script, "the ducho-fast console script is not installed beside this Python"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in (["export"], ["extract", "--no-progress"]):
        proc = subprocess.run(
            [script, *command, str(text_config)], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
    assert subprocess.run(
        [sys.executable, "-m", "ducho_fast", "--version"], capture_output=True, text=True
    ).stdout.startswith("ducho-fast ")


@pytest.mark.slow
def test_a_matrix_not_written_is_not_counted_as_an_item(text_config: Path, tmp_path: Path) -> None:
    """Every text blank: the items fail, so the matrix cannot be assembled; each is said."""
    (tmp_path / "descriptions.tsv").unlink()
    (tmp_path / "descriptions.tsv").write_text("item_id\tdescription\na\t \nb\t\t\n")
    assert runner.invoke(app, ["export", str(text_config)]).exit_code == 0
    layouts = "output.layouts=[ducho, matrix]"
    result = runner.invoke(app, ["extract", str(text_config), "--no-progress", "--set", layouts])
    assert result.exit_code == ITEMS_FAILED_EXIT, result.output
    assert "2 item(s) failed" in result.output
    assert "1 matrix file(s) not written" in result.output


def test_messages_keep_their_square_brackets(tmp_path: Path) -> None:
    """rich took "[ducho, matrix]" in an error message for a markup tag and dropped it."""
    path = tmp_path / "c.yml"
    data = textual_config(tmp_path, {"model_name": "m", "output_layers": 1}, tmp_path / "store")
    path.write_text(yaml.safe_dump({**data, "output": {"layouts": ["matrix"]}}))
    result = runner.invoke(app, ["extract", str(path)])
    assert result.exit_code == 1
    assert "Use layouts: [ducho, matrix]." in result.output


@pytest.mark.slow
def test_export_lists_the_layers(tmp_path: Path, store: Path, resnet18_state_dict: Path) -> None:
    from tests.conftest import resnet18_entry, visual_config

    path = tmp_path / "c.yml"
    path.write_text(
        yaml.safe_dump(visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store))
    )
    result = runner.invoke(app, ["export", str(path)])
    assert result.exit_code == 0, result.output
    assert " [avgpool]: " in result.output


@pytest.mark.slow
def test_export_says_each_model_as_it_goes(
    tmp_path: Path, store: Path, resnet18_state_dict: Path
) -> None:
    """Each model is announced before its (maybe minutes-long) export, and its line printed
    when it is done: a later model's failure does not hide the ones exported before it."""
    from tests.conftest import resnet18_entry, visual_config

    config = visual_config(tmp_path, resnet18_entry(resnet18_state_dict), store)
    bad = resnet18_entry(resnet18_state_dict, output_layers=["no_such_layer"])
    config["visual"]["items"]["model"].append(bad)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["export", str(path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "visual.items.model.0 resnet18: exporting..."
    assert lines[1].startswith("visual.items.model.0 resnet18 [avgpool]: ")
    assert lines[2] == "visual.items.model.1 resnet18: exporting..."
    assert "no_such_layer" in result.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_command_says_what_it_kept_and_exits_128_plus_the_signal(
    sig: signal.Signals, capsys: pytest.CaptureFixture[str], ctrl_c: None
) -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread as Ctrl-C does (Python's own
    handler); the command's hint is printed and the handler given back afterwards."""
    import typer

    from ducho_fast.cli import _errors

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as stopped, _errors(stopped="What was kept."):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this ends
    assert stopped.value.exit_code == 128 + sig
    said = capsys.readouterr().err
    assert f"{sig.name}: stopping once the work under way is done; Ctrl-C or SIGTERM" in said
    assert f"stopped by {sig.name}. What was kept." in said
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(typer.Exit) as raised, _errors(stopped="What was kept."):
        raise KeyboardInterrupt  # raised by the code (a test, a library): said as Ctrl-C
    assert raised.value.exit_code == 128 + signal.SIGINT
    with pytest.raises(KeyboardInterrupt), _errors():  # no hint: not a stoppable command
        raise KeyboardInterrupt


@pytest.mark.parametrize(("first", "second"), [("SIGINT", "SIGTERM"), ("SIGINT", "SIGINT")])
def test_a_second_signal_while_stopping_ends_the_process_at_once(
    first: str, second: str, tmp_path: Path
) -> None:
    """The stop waits for the work under way (a large batch, a reader stuck on a network
    file system); a second signal breaks off that wait and ends the process at once, with
    exit 128 + its number and what it leaves, instead of raising KeyboardInterrupt into the
    stop's clean-up (which ended in ONNX Runtime's "terminate called" abort or hung)."""
    script = tmp_path / "stop.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, time
            from ducho_fast.cli import _errors
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
            with _errors(stopped="What was kept.", quit_now="What is left now."):
                try:
                    os.kill(os.getpid(), signal.{first})
                    time.sleep(30)
                except KeyboardInterrupt:  # the stop's clean-up, which takes long
                    print("stopping", flush=True)
                    os.kill(os.getpid(), signal.{second})
                    time.sleep(30)
                    print("not ended at once", flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    number = getattr(signal, second)
    assert done.returncode == 128 + number, done.stderr
    assert done.stdout == "stopping\n"
    assert f"{first}: stopping once the work under way is done" in done.stderr
    assert f"stopped at once by a second {second}. What is left now." in done.stderr
    assert "What was kept." not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_ignored_signal_stays_ignored(sig: signal.Signals) -> None:
    """nohup's SIGTERM... and SIGINT in a shell's background job."""
    from ducho_fast.cli import _errors

    before = signal.signal(sig, signal.SIG_IGN)
    try:
        with _errors(stopped="What was kept."):
            assert signal.getsignal(sig) is signal.SIG_IGN
            os.kill(os.getpid(), sig)  # ignored: the block goes on
            time.sleep(0.05)
    finally:
        signal.signal(sig, before)


def test_ignored_files_are_named_for_their_job_s_kind(capsys, monkeypatch) -> None:
    """With neither PyAV nor a HEIF plugin (the m4a and heif extras) installed."""
    from types import SimpleNamespace

    from ducho_fast.console import _print_inputs
    from ducho_fast.data.audio import audio
    from ducho_fast.data.visual import images

    monkeypatch.setattr(audio, "pyav_found", lambda: False)
    monkeypatch.setattr(images, "heif_plugin", lambda: None)

    heics = [Path(f"in/IMG_{n}.HEIC") for n in range(3)]
    others = [
        Path(name) for name in ("in/.DS_Store", "in/README", "in/a.txt", "in/b.pdf", "in/c.svg")
    ]
    ignored = {"audio.items": [Path("._a.wav"), Path("b.m4a")], "visual.items": heics + others}
    folders = {"audio.items": [], "visual.items": [Path("in/shoes"), Path("in/hats")]}
    report = SimpleNamespace(
        input_errors={}, ignored_files=ignored, ignored_folders=folders, unpaired={}
    )
    _print_inputs(report)
    said = capsys.readouterr().err
    assert (
        "audio.items: 2 file(s) ignored: 1 hidden (e.g. ._a.wav), 1 .m4a (e.g. b.m4a). Audio "
        "files are read from .aif, .aiff, .flac, .mp3, .oga, .ogg, .opus, .wav. .m4a and .aac "
        "files are read with FFmpeg's decoders: pip install 'ducho-fast[m4a]' (PyAV: FFmpeg's "
        "decoders in a wheel).\n"
    ) in said
    assert (
        "visual.items: 8 file(s) ignored: 3 .heic (e.g. IMG_0.HEIC), 1 hidden (e.g. "
        ".DS_Store), 1 unsuffixed (e.g. README), 1 .txt (e.g. a.txt), 2 of other kinds. Image "
        "files are read from .avif, .bmp, "
    ) in said
    assert ".webp. HEIC/HEIF photos are read with a HEIF plugin: pip install " in said
    assert "visual.items: 2 subfolder(s) not read" in said
    assert "e.g. shoes/" in said
    assert "audio.items: 0" not in said and "audio.items: 1 subfolder" not in said


@pytest.mark.parametrize("command", ["extract", "fuse"])
def test_the_progress_line_interval_comes_from_the_option_or_the_environment(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A week-long job may want a line every 10 minutes, a debugging run every few seconds."""
    import ducho_fast

    every: list[float] = []

    class Lines(console.ProgressLines):
        def __init__(self, label: str, total: int, every_: float) -> None:
            every.append(every_)
            super().__init__(label, total, every_)

    def run(config: Any, overrides: Any, progress: Any = None, **_: Any) -> Any:
        with progress("job model", 3) as tick:
            tick(3)
        raise DuchoError("stop here")

    monkeypatch.setattr(console, "ProgressLines", Lines)
    monkeypatch.setattr(type(console.err), "is_terminal", property(lambda self: False))
    monkeypatch.setattr(ducho_fast, command, run)
    monkeypatch.delenv("DUCHO_FAST_PROGRESS_EVERY", raising=False)
    config = tmp_path / "c.yml"
    config.write_text("{}\n")
    runner.invoke(app, [command, str(config)])
    runner.invoke(app, [command, str(config), "--progress-every", "600"])
    runner.invoke(app, [command, str(config)], env={"DUCHO_FAST_PROGRESS_EVERY": "5"})
    assert every == [30.0, 600.0, 5.0]
    refused = runner.invoke(app, [command, str(config), "--progress-every", "0"])
    assert refused.exit_code == 2 and "--progress-every" in refused.output


def test_help_names_what_each_option_takes_and_fits_a_terminal() -> None:
    """Plain help at 80 columns: each option with what it takes (KEY=VALUE, SECONDS, ...) and
    its help beside it, no type column of <bool>/<list[str]> squeezing the text, and each
    command's line in the command list whole (not cut with '...')."""
    env = {"COLUMNS": "80", "DUCHO_FAST_PROGRESS_EVERY": ""}
    top = runner.invoke(app, ["--help"], env=env)
    assert top.exit_code == 0
    commands = top.output.split("Commands:")[1]
    assert "..." not in commands and "Extract CONFIG's features" in commands
    assert "Print the version and exit." in top.output
    result = runner.invoke(app, ["extract", "--help"], env=env)
    assert result.exit_code == 0
    for shown in ("--set KEY=VALUE", "--progress-every SECONDS", "--shard INDEX/COUNT"):
        assert shown in result.output
    assert "<bool>" not in result.output and "<list[str]>" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
