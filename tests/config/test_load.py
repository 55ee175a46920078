from __future__ import annotations

import errno
import io
import os
import re
import threading
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from ducho_fast.config import load_config
from ducho_fast.errors import ConfigError, NotSupportedYet


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def visual(entry: dict, **extra) -> dict:
    return {
        "dataset_path": ".",
        "visual": {"items": {"input_path": "images", "output_path": "out", "model": [entry]}},
        **extra,
    }


RESNET = {
    "model_name": "ResNet50",
    "backend": "torch",
    "output_layers": "avgpool",
    "reshape": [224, 224],
    "preprocessing": "zscore",
}


def test_ducho_v2_config_resolves_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, visual(RESNET)), cwd=tmp_path)
    (job,) = cfg.jobs
    (spec,) = job.models
    assert job.input_path == tmp_path / "images"
    assert spec.output_layers == ("avgpool",)
    assert spec.reshape == (224, 224)
    assert spec.batch_size == 32  # from config/defaults.yml
    assert spec.model_dir == "ResNet50"
    assert cfg.store == tmp_path / "local" / "models"
    assert cfg.runtime.on_error == "skip"


def test_ducho_v1_spellings_and_list_of_mappings(tmp_path: Path) -> None:
    text = """
dataset_path: ./data
textual:
  - items:
      input_path: d.tsv
      output_path: out
      item_column: asin
      model: [ { name: sentence-transformers/all-mpnet-base-v2, output_layers: 1,
                 clear_text: False, backend: [sentence_transformers] } ]
"""
    cfg = load_config(write(tmp_path, text), cwd=tmp_path)
    spec = cfg.models()[0]
    assert spec.model_name == "sentence-transformers/all-mpnet-base-v2"
    assert spec.backend == "sentence_transformers"
    assert spec.output_layers == (1,)
    assert cfg.jobs[0].item_column == "asin"
    assert spec.model_dir == "sentence-transformers/all-mpnet-base-v2"


def test_a_key_in_two_of_ducho_s_list_entries_is_refused(tmp_path: Path) -> None:
    """Ducho's lists of one-key mappings are read as one mapping: a key two entries give
    kept the later silently (a job's input folder, or a whole block, replaced)."""
    text = """
visual:
  items:
    - input_path: images
    - output_path: out
    - input_path: photos
"""
    with pytest.raises(
        ConfigError,
        match=r"config\.yml: key 'visual\.items\.input_path' is given twice, in entries 0 and "
        r"2 of the list under 'visual\.items', which are read as one mapping",
    ):
        load_config(write(tmp_path, text))
    blocks = "textual:\n  - items: {input_path: a.tsv}\n  - items: {output_path: o}\n"
    with pytest.raises(ConfigError, match=r"key 'textual\.items' is given twice, in entries 0"):
        load_config(write(tmp_path, blocks))


def test_a_model_builder_s_arguments_are_passed_as_written(tmp_path: Path) -> None:
    """A list of mappings inside ``architecture_kwargs`` is an argument's value (a network's
    blocks), not Ducho's loose spelling of one mapping: it was merged into its last entry."""
    (tmp_path / "w.pth").write_bytes(b"")
    kwargs = {"blocks": [{"k": 3}, {"k": 5}], "head": [{"units": 8}], "size": "b0"}
    model = {**RESNET, "model_name": "w.pth", "architecture": "pkg.mod:build", "trust": True}
    entry = visual({**model, "architecture_kwargs": kwargs})
    assert load_config(entry, cwd=tmp_path).models()[0].architecture_kwargs == kwargs
    defaults = visual(model, model={"architecture_kwargs": kwargs})  # every model's default
    assert load_config(defaults, cwd=tmp_path).models()[0].architecture_kwargs == kwargs
    loose = visual({**model, "architecture_kwargs": [{"blocks": kwargs["blocks"]}, {"k": 1}]})
    assert load_config(loose, cwd=tmp_path).models()[0].architecture_kwargs == {
        "blocks": kwargs["blocks"],  # Ducho's loose spelling of the mapping itself
        "k": 1,
    }


def test_unknown_key_names_file_path_and_suggestion(tmp_path: Path) -> None:
    bad = {**RESNET, "output_layer": "avgpool"}
    path = write(tmp_path, visual(bad))
    with pytest.raises(
        ConfigError,
        match=r"config\.yml: unknown key 'visual\.items\.model\.0\.output_layer'\. "
        r"Did you mean 'output_layers'",
    ):
        load_config(path, cwd=tmp_path)


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (
            {"device": "cuda"},
            r"'device'\. 'device' is a key of another section: runtime\.device; move it there\."
            r"\nAllowed here: audio, ",
        ),
        (
            {"batch_size": 4},
            r"'batch_size'\. .*: <modality>\.<items\|interactions>\.model\[\]\.batch_size or "
            r"model\.batch_size; move",
        ),
        ({"runtime": {"squeeze": True}}, r"'runtime\.squeeze'\. .*: output\.squeeze; move"),
        ({"mode": "x"}, r"'mode'\. Did you mean 'model'\? 'mode' is .*: fusion\[\]\.mode;"),
        ({"visual": {"input_path": "x"}}, r"'visual\.input_path'\. .*: visual\.<items\|"),
        (
            {"visual": {"items": {"batch_size": 4}}},
            r"'visual\.items\.batch_size'\. .*: visual\.items\.model\[\]\.batch_size or",
        ),
        (
            {"visual": {"items": {"model": [{"input_path": "x"}]}}},
            r"'visual\.items\.model\.0\.input_path'\. .*: visual\.items\.input_path;",
        ),
        ({"dataset": "x"}, r"'dataset'\. Did you mean 'dataset_path'\?\nAllowed"),
    ],
)
def test_a_key_at_the_wrong_level_names_where_it_goes(tmp_path: Path, where, says) -> None:
    with pytest.raises(ConfigError, match=r"config\.yml: unknown key " + says):
        load_config(write(tmp_path, where), cwd=tmp_path)


def test_wrong_type_is_reported_with_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, visual({**RESNET, "batch_size": "big"}))
    with pytest.raises(
        ConfigError,
        match=r"'visual\.items\.model\.0\.batch_size' must be an integer, found a string 'big'",
    ):
        load_config(path, cwd=tmp_path)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("entry", "where", "found"),
    [
        ({"mean": [NAN, 0.4, 0.4]}, "mean.0", r"nan \(YAML's \.nan\)"),
        ({"std": [0.2, INF, 0.2]}, "std.1", r"inf \(YAML's \.inf\)"),
        ({"std": [0.2, 0.2, -INF]}, "std.2", r"-inf \(YAML's \.inf\)"),
    ],
)
def test_a_number_that_is_not_finite_is_refused(
    tmp_path: Path, entry: dict, where: str, found: str
) -> None:
    """An infinite std zeroed a channel silently, a NaN limit of seconds compared as no
    limit, and a NaN mean failed export with "the source model itself returns NaN ... check
    the weights"."""
    key = rf"'visual\.items\.model\.0\.{where}'"
    with pytest.raises(
        ConfigError, match=rf"config\.yml: key {key} must be a finite number, found {found}"
    ):
        load_config(write(tmp_path, visual({**RESNET, **entry})))  # written .nan, .inf
    limit = visual(RESNET, input={"max_audio_seconds": NAN})
    with pytest.raises(ConfigError, match=r"'input\.max_audio_seconds' must be a finite number"):
        load_config(write(tmp_path, limit))


def test_a_key_left_empty_is_named_with_the_fix(tmp_path: Path) -> None:
    """``visual:`` with nothing under it (its block deleted, or indented wrong) is null."""
    path = tmp_path / "config.yml"
    path.write_text("visual:\ntextual:\n  items:\n    input_path: d.tsv\n")
    with pytest.raises(
        ConfigError,
        match=r"config\.yml: key 'visual' must be a mapping, found no value \(null, or a YAML "
        r"key with nothing after its colon\): give it one, or remove the key\.$",
    ):
        load_config(path, cwd=tmp_path)


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    path = write(tmp_path, visual({**RESNET, "batch_size": True}))
    with pytest.raises(ConfigError, match=r"must be an integer, found true/false"):
        load_config(path, cwd=tmp_path)


def test_bad_choice_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, visual({**RESNET, "preprocessing": "zscor"}))
    with pytest.raises(
        ConfigError, match=r"'zscor'; allowed: 'zscore', 'minmax', .*None\. Did you mean 'zscore'"
    ):
        load_config(path, cwd=tmp_path)


@pytest.mark.parametrize(
    ("reshape", "message"),
    [
        ([224, 0], r"is \[224, 0\]; it must be two positive integers"),
        ([224], r"is \[224\]; it must be two positive integers"),
        ([100000, 100000], r"is \[100000, 100000\]; each side must be at most 8192 pixels"),
        ([224, 8193], r"is \[224, 8193\]; each side must be at most 8192"),
    ],
)
def test_a_reshape_no_model_takes_is_refused(tmp_path: Path, reshape, message) -> None:
    """Exporting at 100000 x 100000 ended in torch's allocator's traceback (60 GB)."""
    path = write(tmp_path, visual({**RESNET, "reshape": reshape}))
    with pytest.raises(ConfigError, match=r"'visual\.items\.model\.0\.reshape' " + message):
        load_config(path, cwd=tmp_path)
    assert load_config(
        write(tmp_path, visual({**RESNET, "reshape": [8192, 8192]})), cwd=tmp_path
    ).models()[0].reshape == (8192, 8192)


def test_mean_std_need_zscore_as_ducho(tmp_path: Path) -> None:
    model = {**RESNET, "preprocessing": "minmax", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    with pytest.raises(ConfigError, match=r"only apply with preprocessing: zscore"):
        load_config(write(tmp_path, visual(model)), cwd=tmp_path)


def test_weights_are_not_an_architecture_argument(tmp_path: Path) -> None:
    """The builders take the weights from the weights key; one in architecture_kwargs would
    clash with it (or, merged, override it unseen)."""
    model = {**RESNET, "architecture_kwargs": {"weights": "IMAGENET1K_V2"}}
    with pytest.raises(
        ConfigError,
        match=r"'visual\.items\.model\.0\.architecture_kwargs' holds 'weights'; say which "
        r"weights with the key 'visual\.items\.model\.0\.weights'",
    ):
        load_config(write(tmp_path, visual(model)), cwd=tmp_path)


def test_torch_layer_index_is_refused_with_hint(tmp_path: Path) -> None:
    path = write(tmp_path, visual({**RESNET, "output_layers": [3]}))
    with pytest.raises(
        ConfigError, match=r"must name torch layers.*ducho-fast layers torch ResNet50"
    ):
        load_config(path, cwd=tmp_path)


def test_missing_output_layers_for_torch(tmp_path: Path) -> None:
    model = {k: v for k, v in RESNET.items() if k != "output_layers"}
    with pytest.raises(
        ConfigError, match=r"needs the key 'visual\.items\.model\.0\.output_layers'"
    ):
        load_config(write(tmp_path, visual(model)), cwd=tmp_path)


def test_transformers_layer_defaults_to_pooler_output(tmp_path: Path) -> None:
    data = {
        "textual": {
            "items": {
                "input_path": "d.tsv",
                "output_path": "o",
                "model": [{"model_name": "bert-base-uncased"}],
            }
        }
    }
    spec = load_config(write(tmp_path, data), cwd=tmp_path).models()[0]
    assert spec.backend == "transformers" and spec.output_layers == ("pooler_output",)


@pytest.mark.parametrize(("block", "origin"), [("visual_textual", "interactions")])
def test_later_blocks_say_not_supported_yet(tmp_path: Path, block: str, origin: str) -> None:
    data = {
        block: {origin: {"input_path": "x", "output_path": "y", "model": [{"model_name": "m"}]}}
    }
    with pytest.raises(
        NotSupportedYet, match=rf"'{block}\.{origin}' is understood but not supported yet"
    ):
        load_config(write(tmp_path, data), cwd=tmp_path)


TEXT = {"model_name": "bert", "backend": "transformers"}


@pytest.mark.parametrize(
    ("modality", "entry", "key"),
    [
        ("textual", {**TEXT, "weights": "finetuned.pth"}, "weights"),
        ("textual", {**TEXT, "architecture": "pkg.mod:build", "trust": True}, "architecture"),
        (
            "textual",
            {**TEXT, "backend": "sentence_transformers", "output_layers": 1, "tokenizer_name": "b"},
            "tokenizer_name",
        ),
        ("visual", {**RESNET, "max_length": 128}, "max_length"),
        ("visual", {**RESNET, "backend": "tensorflow", "architecture": "a.b:c"}, "architecture"),
        ("audio", {"model_name": "facebook/wav2vec2-base", "weights": "w.pth"}, "weights"),
    ],
)
def test_a_key_the_model_would_ignore_is_refused(
    tmp_path: Path, modality: str, entry: dict, key: str
) -> None:
    """A text model's ``weights`` (a fine-tuned state dict) or ``architecture`` was
    ignored: the pretrained model's features came out, silently."""
    (tmp_path / "finetuned.pth").write_bytes(b"")
    (tmp_path / "w.pth").write_bytes(b"")
    inputs = {"textual": "d.tsv", "visual": "images", "audio": "tracks"}
    raw = {
        modality: {"items": {"input_path": inputs[modality], "output_path": "o", "model": [entry]}}
    }
    with pytest.raises(
        ConfigError, match=rf"key '{modality}\.items\.model\.0\.{key}' does not apply to "
    ):
        load_config(raw, cwd=tmp_path)


def test_model_defaults_apply_where_they_can(tmp_path: Path) -> None:
    """A key of the top-level ``model`` defaults is for every entry that reads it: a text
    model's max_length beside an image model is not refused there."""
    raw = visual(RESNET, model={"max_length": 64})
    raw["textual"] = {"items": {"input_path": "d.tsv", "output_path": "t", "model": [TEXT]}}
    cfg = load_config(raw, cwd=tmp_path)
    assert [m.max_length for m in cfg.models()] == [64, 64]
    assert (
        load_config(visual(RESNET, model={"weights": "none"}), cwd=tmp_path).models()[0].weights
        == "none"
    )


@pytest.mark.parametrize("backend", ["transformers"])
def test_later_visual_backends_say_not_supported_yet(tmp_path: Path, backend: str) -> None:
    model = {**RESNET, "backend": backend}
    with pytest.raises(
        NotSupportedYet, match=rf"'{backend}' for visual models, which is not supported yet"
    ):
        load_config(write(tmp_path, visual(model)), cwd=tmp_path)


def test_backend_must_fit_modality(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not extract visual features"):
        load_config(
            write(tmp_path, visual({**RESNET, "backend": "sentence_transformers"})), cwd=tmp_path
        )


def test_block_needs_paths_and_model(tmp_path: Path) -> None:
    data = {"visual": {"items": {"input_path": "images", "model": [RESNET]}}}
    with pytest.raises(ConfigError, match=r"needs the key 'visual\.items\.output_path'"):
        load_config(write(tmp_path, data), cwd=tmp_path)


def test_empty_config_says_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothing to extract"):
        load_config(write(tmp_path, {"dataset_path": "."}), cwd=tmp_path)


def test_a_loop_of_links_on_a_path_is_named_by_its_key(tmp_path: Path) -> None:
    """Path.resolve raises RuntimeError on a loop of symbolic links (before Python 3.13):
    the run ended with a traceback; now the key and the fix are named."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for data, key in [
        (visual(RESNET), "dataset_path"),
        ({**visual(RESNET), "dataset_path": "."}, "visual.items.input_path"),
        (visual(RESNET, store="a/models"), "store"),
        (visual(RESNET, output={"id_order": "a"}), "output.id_order"),
    ]:
        if key == "dataset_path":
            data = {**data, "dataset_path": "a"}
        elif key == "visual.items.input_path":
            data["visual"]["items"]["input_path"] = "a/images"
        with pytest.raises(
            ConfigError,
            match=rf"config\.yml: key '{key}': \S+ cannot be reached: a symbolic link on it "
            r"leads round in a loop \(.*\)\. Fix or remove that link\.",
        ):
            load_config(write(tmp_path, data), cwd=tmp_path)
    fused = {"fusion": [{"inputs": ["x", "a"], "mode": "concat", "output_path": "f"}]}
    with pytest.raises(ConfigError, match=r"key 'fusion\.0\.inputs\.1': .*a cannot be reached"):
        load_config(write(tmp_path, fused), cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"config file '.*a' cannot be reached: a symbolic"):
        load_config(tmp_path / "a")
    (tmp_path / "gone.yml").symlink_to(tmp_path / "nowhere.yml")
    with pytest.raises(
        ConfigError,
        match=r"gone\.yml' does not exist: it is a symbolic link to .*nowhere\.yml, which is miss",
    ):
        load_config(tmp_path / "gone.yml")


def test_a_path_no_file_system_takes_is_named_by_its_key(tmp_path: Path, monkeypatch) -> None:
    """A NUL character or a name over 255 bytes ended the load in ValueError or OSError."""
    data = visual(RESNET)
    data["visual"]["items"]["output_path"] = "o\0ut"
    with pytest.raises(
        ConfigError, match=r"key 'visual.items.output_path' holds a NUL character \('\\0'\)"
    ):
        load_config(write(tmp_path, data), cwd=tmp_path)
    data["visual"]["items"]["output_path"] = "out"
    long_names = [("dataset_path", "not-made/" + "d" * 256), ("store", "s" * 300 + "/models")]
    for key, value in long_names:  # 256 bytes: one too many
        with pytest.raises(
            ConfigError, match=rf"key '{key}': .* is longer than its file system allows"
        ):
            load_config(write(tmp_path, {**data, key: value}), cwd=tmp_path)
    load_config(write(tmp_path, {**data, "dataset_path": "not-made/" + "d" * 255}), cwd=tmp_path)

    def path_of(length: int) -> str:  # an absolute path of ``length`` bytes, in short names
        path = str(tmp_path / "not-made")
        while length - len(path) > 202:
            path += "/" + "d" * 200
        return path + "/" + "d" * (length - len(path) - 1)

    load_config(write(tmp_path, {**data, "store": path_of(4095)}), cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"key 'store': .* is longer than its file system"):
        load_config(write(tmp_path, {**data, "store": path_of(4096)}), cwd=tmp_path)
    lstat = os.lstat

    def short_names(path, *args, **kwargs):  # a file system with a shorter limit (eCryptfs)
        if b"short-fs" in os.fsencode(path):
            raise OSError(errno.ENAMETOOLONG, "File name too long", path)
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", short_names)
    with pytest.raises(ConfigError, match=r"key 'dataset_path': .*short-fs is longer than"):
        load_config(write(tmp_path, {**data, "dataset_path": "short-fs"}), cwd=tmp_path)
    # a model's name is looked for as a path (by the libraries too): the OSError of a stat
    for key, value in [
        ("model_name", "x" * 300),
        ("model_name", "x\0y"),
        ("tokenizer_name", "t" * 256),
    ]:
        with pytest.raises(
            ConfigError,
            match=rf"key 'visual.items.model.0.{key}' is '.+', which no file system takes as a "
            r"path \(it holds a NUL character, a name over 255 bytes or 4096 bytes or more in "
            r"all\) and no hub or library names a model so: give the model's file or folder",
        ):
            load_config(visual({**RESNET, key: value}), cwd=tmp_path)
    spec = load_config(visual({**RESNET, "model_name": "x" * 255}), cwd=tmp_path).jobs[0].models[0]
    assert spec.model_name == "x" * 255  # a name, for the exporter to look up (and refuse)


def test_a_working_folder_removed_under_the_shell_is_named(tmp_path: Path, monkeypatch) -> None:
    """Path.cwd raised FileNotFoundError: a traceback from a run given an absolute config."""
    from ducho_fast.config.paths import resolved

    config = write(tmp_path, visual(RESNET))
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ConfigError, match=r"^the working folder cannot be found \(No such file"):
        load_config(config)
    with pytest.raises(
        ConfigError, match=r"^c\.yml: key 'store': rel cannot be made absolute \(No such file"
    ):
        resolved(Path("rel"), "c.yml", "store")
    assert load_config(config, cwd=tmp_path).jobs[0].input_path == tmp_path / "images"


def test_missing_file_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(
        ConfigError,
        match=r"not valid YAML at line 2, column 1: expected ',' or "
        r"'\]', but got '<stream end>' \(while parsing a flow sequence that starts "
        r"at line 1, column 9\)\.$",
    ):
        load_config(write(tmp_path, "visual: [unclosed\n"))
    tab = (
        r"config\.yml: not valid YAML at line 3, column 1: found character '\\t' .* replace the tab"
    )
    with pytest.raises(ConfigError, match=tab + r" with spaces\.\n\s+input_path: x\n\s+\^$"):
        load_config(write(tmp_path, "visual:\n  items:\n\tinput_path: x\n"))
    with pytest.raises(
        ConfigError, match=r"line 1, column 5: mapping values are not allowed here\.\n"
    ):
        load_config(write(tmp_path, "a: b: c\n"))
    with pytest.raises(ConfigError, match=r"is a folder; give the YAML file in it"):
        load_config(tmp_path)  # it said "does not exist"


def test_a_config_from_a_pipe_is_read_once(tmp_path: Path) -> None:
    """``ducho-fast extract <(sed ... config.yml)``: the shell gives a named pipe's path."""
    pipe = tmp_path / "piped.yml"
    os.mkfifo(pipe)
    model = "{model_name: m, backend: sentence_transformers, output_layers: 1}"
    items = f"{{input_path: d.tsv, output_path: out, model: [{model}]}}"
    text = f"dataset_path: data\ntextual:\n  items: {items}\n"
    # Opening a pipe to write waits for its reader: the config's, unless a regression
    # refuses it unread; then the test fails without waiting for good.
    writer = threading.Thread(target=pipe.write_text, args=(text,), daemon=True)
    writer.start()
    try:
        cfg = load_config(pipe, cwd=tmp_path)
    finally:
        with suppress(OSError):  # no reader came: let the writer go
            os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
    assert cfg.jobs[0].input_path == tmp_path / "data" / "d.tsv"


class _Stdin(io.TextIOWrapper):
    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(io.BytesIO(text.encode("utf-8")), encoding="utf-8")
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_config_from_standard_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``envsubst < config.yml | ducho-fast extract -``: ``-`` reads standard input, its
    errors named ``<stdin>``; a terminal there is refused, not waited on."""
    model = "{model_name: m, backend: sentence_transformers, output_layers: 1}"
    items = f"{{input_path: d.tsv, output_path: o, model: [{model}]}}"
    text = f"dataset_path: data\ntextual:\n  items: {items}\n"
    monkeypatch.setattr("sys.stdin", _Stdin(text))
    cfg = load_config("-", cwd=tmp_path)
    assert cfg.jobs[0].input_path == tmp_path / "data" / "d.tsv"
    assert cfg.source == "<stdin>"
    monkeypatch.setattr("sys.stdin", _Stdin(text))
    with pytest.raises(ConfigError, match=r"^<stdin>: key 'runtime.workers' must be"):
        load_config(Path("-"), ["runtime.workers=x"], cwd=tmp_path)
    monkeypatch.setattr("sys.stdin", _Stdin("visual: [\n"))
    with pytest.raises(ConfigError, match=r"^<stdin>: not valid YAML"):
        load_config("-", cwd=tmp_path)
    monkeypatch.setattr("sys.stdin", _Stdin(text, tty=True))
    with pytest.raises(ConfigError, match=r"standard input, which is a terminal here: pipe it"):
        load_config("-", cwd=tmp_path)
    monkeypatch.setattr("sys.stdin", None)  # pythonw, a daemon with fd 0 closed
    with pytest.raises(ConfigError, match=r"reads standard input, which this process has not"):
        load_config("-", cwd=tmp_path)
    (tmp_path / "-").write_text(text)  # a file named '-' is given with its folder
    assert load_config(tmp_path / "-", cwd=tmp_path).source == str(tmp_path / "-")


def test_a_key_given_twice_is_refused_not_dropped(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys silently: a second 'visual:' block would drop
    the first block's jobs. A key after a merge (<<) still overrides the merged one."""
    config = """\
dataset_path: .
visual:
  items: {input_path: images, output_path: out, model: [{model_name: resnet18, output_layers: fc}]}
textual:
  items: {input_path: texts.tsv, output_path: t, model: [{model_name: bert}]}
visual:
  interactions: {input_path: photos, output_path: p, model: [{model_name: resnet18}]}
"""
    with pytest.raises(
        ConfigError,
        match=r"config\.yml: key 'visual' is given twice in one mapping \(lines 2 and 6\): YAML "
        r"keeps only the last, so what the first holds would be ignored\. Merge",
    ):
        load_config(write(tmp_path, config))
    nested = """\
visual:
  items:
    input_path: images
    output_path: out
    model:
      - model_name: resnet18
        output_layers: fc
        batch_size: 4
        batch_size: 8
"""
    with pytest.raises(ConfigError, match=r"key 'batch_size' is given twice .*lines 8 and 9"):
        load_config(write(tmp_path, nested))
    merged = """\
visual:
  items:
    input_path: images
    output_path: out
    model:
      - &first {model_name: resnet18, output_layers: fc, batch_size: 4}
      - <<: *first
        output_layers: avgpool
"""
    first, second = load_config(write(tmp_path, merged)).jobs[0].models
    assert (first.output_layers, second.output_layers) == (("fc",), ("avgpool",))
    assert second.batch_size == 4


@pytest.mark.parametrize(
    ("source", "found"),
    [(None, "NoneType"), (3, "int"), ([], "list"), ("", "an empty path"), (b"c.yml", "bytes")],
)
def test_what_is_not_a_config_is_named(source: object, found: str) -> None:
    with pytest.raises(ConfigError, match=rf"a config is the path of a YAML file.*; found {found}"):
        load_config(source)  # type: ignore[arg-type]


def test_overrides_given_in_code_are_a_list_of_strings(tmp_path: Path) -> None:
    path = write(tmp_path, {"dataset_path": "."})
    with pytest.raises(ConfigError, match=r"strings; found str: pass \[.dataset_path=x.\]"):
        load_config(path, "dataset_path=x", cwd=tmp_path)  # not one override per character
    with pytest.raises(ConfigError, match=r"override 3 is not a string \(int\)"):
        load_config(path, ["dataset_path=x", 3], cwd=tmp_path)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"strings; found int\.$"):
        load_config(path, 3, cwd=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"nothing to extract"):  # None: no overrides
        load_config(path, None, cwd=tmp_path)


def test_an_unreadable_config_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, {"dataset_path": "."})

    def denied(self: Path, *_: object, **__: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\); check its"):
        load_config(path)


@pytest.mark.parametrize(
    ("gpu", "device"), [(-1, "cpu"), (0, "cuda:0"), ("1,2", "cuda:1"), ([3], "cuda:3")]
)
def test_ducho_gpu_list_sets_device(tmp_path: Path, gpu, device: str) -> None:
    cfg = load_config(write(tmp_path, visual(RESNET, **{"gpu list": gpu})), cwd=tmp_path)
    assert cfg.runtime.device == device


def test_runtime_device_is_checked(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'runtime\.device' is 'gpu'; allowed: auto, cpu, cuda, cuda:N"
    ):
        load_config(write(tmp_path, visual(RESNET, runtime={"device": "gpu"})), cwd=tmp_path)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"runtime": {"device": "cuda:\u00b2"}}, r"'runtime\.device' is 'cuda:\u00b2'; allowed"),
        ({"gpu list": "\u00b2"}, r"'gpu list' is '\u00b2'; use -1 for CPU or GPU ids"),
        (
            {"runtime": {"cuda_options": {"gpu_mem_limit": "\u00b2"}}},
            r"'runtime\.cuda_options\.gpu_mem_limit' is '\u00b2'; give the limit in bytes",
        ),
    ],
)
def test_a_digit_that_is_no_number_is_refused_not_a_traceback(
    tmp_path: Path, extra: dict, says: str
) -> None:
    """``²`` passes ``str.isdigit`` and fails ``int``: a ValueError traceback before."""
    with pytest.raises(ConfigError, match=says):
        load_config(visual(RESNET, **extra), cwd=tmp_path)


def test_weights_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'visual\.items\.model\.0\.weights' is 'w\.pth', which is neither"
    ):
        load_config(write(tmp_path, visual({**RESNET, "weights": "w.pth"})), cwd=tmp_path)


def test_local_model_paths_resolve_under_dataset_path_then_cwd(tmp_path: Path) -> None:
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "a.pt").write_bytes(b"x")
    (tmp_path / "b.pt").write_bytes(b"x")
    data = visual({**RESNET, "model_name": "models/a.pt"}, dataset_path="data")
    data["visual"]["items"]["model"].append({**RESNET, "model_name": "b.pt"})
    a, b = load_config(write(tmp_path, data), cwd=tmp_path).models()
    assert a.local_path == tmp_path / "data" / "models" / "a.pt"
    assert b.local_path == tmp_path / "b.pt"
    assert a.model_dir == "a" and b.model_dir == "b"


def test_model_level_defaults_apply_to_every_entry(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, visual(RESNET, model={"batch_size": 7})), cwd=tmp_path)
    assert cfg.models()[0].batch_size == 7


@pytest.mark.parametrize("key", ["token_budget", "sort_window", "concurrent_batches", "writers"])
def test_batching_keys_are_counts(tmp_path: Path, key: str) -> None:
    cfg = load_config(write(tmp_path, visual(RESNET, runtime={key: 8})), cwd=tmp_path)
    assert getattr(cfg.runtime, key) == 8
    with pytest.raises(ConfigError, match=rf"'runtime\.{key}' must be >= 0 \(0 = automatic\)"):
        load_config(write(tmp_path, visual(RESNET, runtime={key: -1})), cwd=tmp_path)


@pytest.mark.parametrize("key", ["threads", "workers"])
def test_thread_counts_no_machine_has_are_refused(tmp_path: Path, key: str) -> None:
    """runtime.threads: 100000 hung extract, taking the system's thread limit from every
    other process; as many workers would read every input ahead."""
    cfg = load_config(write(tmp_path, visual(RESNET, runtime={key: 1024})), cwd=tmp_path)
    assert getattr(cfg.runtime, key) == 1024
    with pytest.raises(
        ConfigError, match=rf"'runtime\.{key}' is 100000; at most 1024 \(0 = one per usable CPU"
    ):
        load_config(write(tmp_path, visual(RESNET, runtime={key: 100000})), cwd=tmp_path)


def test_more_writers_than_ever_help_are_refused(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, visual(RESNET, runtime={"writers": 64})), cwd=tmp_path)
    assert cfg.runtime.writers == 64
    with pytest.raises(
        ConfigError, match=r"'runtime\.writers' is 65; at most 64 \(0 = one, and up to 8 as"
    ):
        load_config(write(tmp_path, visual(RESNET, runtime={"writers": 65})), cwd=tmp_path)


def test_the_readme_s_configs_load() -> None:
    """Each YAML example of the README is a config as it stands; the fusion example is added
    to the first, whose model entries it names."""
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    assert len(blocks) >= 6
    for block in blocks:
        raw = {**blocks[0], **block} if list(block) == ["fusion"] else block
        load_config(raw, name="README.md")
