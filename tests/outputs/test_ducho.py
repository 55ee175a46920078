"""Ducho's layout cannot be steered outside the output folder by model names or ids."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from ducho_fast.config.model import Job, ModelSpec
from ducho_fast.errors import DataError, OutputError
from ducho_fast.outputs.atomic import NpyFiles
from ducho_fast.outputs.ducho import DuchoWriter, layer_dir, load_feature, write_error


def spec(model_name: str, modality: str = "textual") -> ModelSpec:
    return ModelSpec(
        modality=modality,
        origin="items",
        key_path=f"{modality}.items.model.0",
        model_name=model_name,
        backend="transformers",
        backend_dir="transformers",
        output_layers=("pooler_output",),
        batch_size=2,
    )


def job(tmp_path: Path, model: ModelSpec) -> Job:
    return Job("textual", "items", tmp_path / "in.tsv", tmp_path / "out", (model,))


@pytest.mark.parametrize(
    "name", ["../../evil/model", "/abs/models/bert", "..", "a/./../../b", "C:\\models\\..\\x"]
)
def test_model_names_stay_inside_the_output_folder(tmp_path: Path, name: str) -> None:
    model = spec(name)
    folder = layer_dir(job(tmp_path, model), model, "pooler_output").resolve()
    assert folder.is_relative_to((tmp_path / "out" / "transformers").resolve())


def test_unsafe_ids_are_never_written(tmp_path: Path) -> None:
    model = spec("bert")
    writer = DuchoWriter(job(tmp_path, model), model, squeeze=False)
    for item_id in ("../../x", "a/b", "\x00", "x" * 300, ".."):
        with pytest.raises(DataError, match=r"cannot be a file name"):
            writer.write(item_id, {"pooler_output": np.zeros(3, np.float32)})
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_float16_features_beyond_its_range_fail_instead_of_becoming_infinity(
    tmp_path: Path,
) -> None:
    model = ModelSpec(**{**spec("bert").__dict__, "output_layers": ("pooler_output", "1")})
    writer = DuchoWriter(job(tmp_path, model), model, squeeze=True, dtype="float16")
    big = {"pooler_output": np.ones(3, np.float32), "1": np.array([1.0, -7e4, 0], np.float32)}
    with pytest.raises(DataError, match=r"the '1' features exceed float16's range \(\+-65504\)"):
        writer.write("a", big)
    assert not [p for p in tmp_path.rglob("*.npy")]  # neither layer: no half-written item
    writer.write("b", {"pooler_output": np.ones(3, np.float32), "1": np.full(3, 6e4, np.float32)})
    assert np.isfinite(np.load(writer.path("1", "b"))).all()
    wide = DuchoWriter(job(tmp_path, model), model, squeeze=True)  # float32 holds it
    wide.write("a", big)
    assert np.load(wide.path("1", "a"))[1] == -7e4


def test_features_read_back_as_np_load_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # load_feature parses a header once per kind of file; every array comes back as np.load
    # gives it (dtype, shape, values, writable), whatever the files read before it.
    arrays: dict[str, np.ndarray] = {
        "row": np.random.default_rng(0).random((1, 5), dtype=np.float32),
        "half": np.arange(3, dtype=np.float16),
        "tokens": np.ones((1, 7, 4), np.float32),
        "tokens_longer": np.zeros((1, 9, 4), np.float32),  # same dtype, another shape
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">f4"),
    }
    for _ in range(2):  # the second time, every header is known
        for name, array in arrays.items():
            np.save(tmp_path / f"{name}.npy", array)
            got = load_feature(tmp_path / f"{name}.npy")
            assert got.dtype == array.dtype and got.shape == array.shape, name
            assert np.array_equal(got, array) and got.flags.writeable, name
    np.save(tmp_path / "plain.npy", arrays["row"])
    with monkeypatch.context() as m:  # a plain, complete file never needs np.load
        m.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called"))
        assert np.array_equal(load_feature(tmp_path / "plain.npy"), arrays["row"])
    with (tmp_path / "v2.npy").open("wb") as f:  # format 2.0: a 4-byte header length
        np.lib.format.write_array(f, np.ones((2, 3), np.float32), version=(2, 0))
    assert np.array_equal(load_feature(tmp_path / "v2.npy"), np.ones((2, 3)))

    whole = (tmp_path / "row.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:-3])  # the header known, the data short
    (tmp_path / "longer.npy").write_bytes(whole + b"\0")  # np.load reads what it needs
    assert np.array_equal(load_feature(tmp_path / "longer.npy"), arrays["row"])
    (tmp_path / "blank.npy").write_bytes(b"")
    for name, why in [("cut", "ValueError"), ("blank", "EOFError"), ("none", "FileNotFound")]:
        with pytest.raises(
            DataError, match=rf"{name}\.npy is not a readable \.npy feature \({why}"
        ):
            load_feature(tmp_path / f"{name}.npy")


def refusing(names: dict[str, int]):
    """``NpyFiles.save`` as a file system that refuses some names (errno by file name)."""
    save = NpyFiles.save

    def refuse(self: NpyFiles, path: Path, array: np.ndarray) -> None:
        if path.name in names:
            raise OSError(names[path.name], os.strerror(names[path.name]))
        save(self, path, array)

    return refuse


def test_a_file_name_the_file_system_refuses_fails_only_its_item(
    tmp_path: Path, monkeypatch
) -> None:
    """exFAT, FAT and NTFS refuse ':' and '?' (ENOENT through FUSE, EINVAL from the kernel):
    the item fails; anything else, or a folder gone, stops the run (OutputError)."""
    names = {"a:b.npy": errno.ENOENT, "q?.npy": errno.EINVAL, "full.npy": errno.ENOSPC}
    monkeypatch.setattr(NpyFiles, "save", refusing(names))
    model = spec("bert")
    writer = DuchoWriter(job(tmp_path, model), model, squeeze=False)
    out = {"pooler_output": np.ones(3, np.float32)}
    writer.write("ok", out)
    folder = writer.path("pooler_output", "ok").parent
    for item_id, why in (("a:b", "No such file or directory"), ("q?", "Invalid argument")):
        with pytest.raises(DataError) as caught:
            writer.write(item_id, out)
        assert str(caught.value).startswith(
            f"the file system of {folder} refuses the file name '{item_id}.npy' ({why}); "
            "rename the item (exFAT, FAT and NTFS refuse"
        )
    with pytest.raises(OutputError, match=r"cannot write .*full\.npy: No space left on device"):
        writer.write("full", out)
    assert isinstance(
        write_error(tmp_path / "gone" / "x.npy", OSError(errno.ENOENT, "no")), OutputError
    )
    assert sorted(p.name for p in folder.iterdir()) == ["ok.npy"]
