"""The runtime path never needs torch, TensorFlow or transformers: proven in a subprocess
where importing them fails, as on a core install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import ducho_fast
from tests.conftest import audio_config, textual_config, visual_config, write_tone

BLOCKER = """
import sys
class Block:
    names = ("torch", "torchvision", "torchaudio", "tensorflow", "keras", "transformers",
             "sentence_transformers", "tf2onnx", "onnx")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)


def test_cli_imports_without_frameworks(tmp_path: Path) -> None:
    proc = run_blocked("import ducho_fast, ducho_fast.cli, ducho_fast.api; print('ok')", tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_without_onnxruntime_the_error_names_the_extras(tmp_path: Path) -> None:
    code = "import sys; sys.modules['onnxruntime'] = None; import ducho_fast"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "pip install 'ducho-fast[cpu]'" in proc.stderr
    assert "pip install 'ducho-fast[gpu]'" in proc.stderr and "Never both" in proc.stderr


def test_decoder_workers_start_without_onnxruntime(tmp_path: Path) -> None:
    """What a decoder worker process imports (``runtime.readers: processes``) loads no ONNX
    Runtime: the package's names are imported on first use."""
    code = """
        import sys
        import ducho_fast.runtime.decoders
        assert "onnxruntime" not in sys.modules, "imported by the worker's modules"
        import ducho_fast
        assert not hasattr(ducho_fast, "no_such_name")
        assert ducho_fast.api.ExtractReport  # a submodule not imported yet: found as before
        from ducho_fast import extract, load
        assert "onnxruntime" in sys.modules and callable(extract) and callable(load)
        assert ducho_fast.api.extract is extract
        print("ok")
    """
    proc = run_blocked(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_extract_and_embed_without_frameworks(
    tmp_path,
    store,
    image_dir,
    texts_tsv,
    minilm_dir,
    resnet18_state_dict,
    tiny_clip_dir,
    tiny_wav2vec2_dir,
) -> None:
    (tmp_path / "images").symlink_to(image_dir)
    (tmp_path / "audio").mkdir()
    write_tone(tmp_path / "audio" / "a1.wav", rate=22_050, channels=2)
    write_tone(tmp_path / "audio" / "a2.flac", seconds=0.7)
    (tmp_path / "descriptions.tsv").symlink_to(texts_tsv)
    config = visual_config(
        tmp_path,
        {
            "model_name": "resnet18",
            "weights": str(resnet18_state_dict),
            "output_layers": "avgpool",
            "reshape": [64, 64],
        },
        store,
    )
    config["textual"] = textual_config(
        tmp_path,
        {"model_name": str(minilm_dir), "backend": "sentence_transformers", "output_layers": 1},
        store,
    )["textual"]
    config["audio"] = audio_config(
        tmp_path,
        {"model_name": str(tiny_wav2vec2_dir), "backend": "transformers", "pooling": "mean"},
        store,
    )["audio"]
    config["audio"]["items"]["output_path"] = "aud"
    config["visual_textual"] = {
        "items": {
            "input_path": {"visual": "images", "textual": "descriptions.tsv"},
            "output_path": {"visual": "vis", "textual": "txt"},
            "model": [{"model_name": str(tiny_clip_dir), "fusion": "mean"}],
        }
    }
    config["fusion"] = [
        {
            "inputs": ["visual.items.model.0", "textual.items.model.0"],
            "mode": "concat",
            "output_path": "fused",
        }
    ]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    artifacts = [r.artifact.path for r in ducho_fast.export(path)]
    proc = run_blocked(
        f"""
        import ducho_fast
        report = ducho_fast.extract({str(path)!r})
        assert [r.result.written for r in report.runs] == [10, 11, 2, 10, 10], report
        assert [f.results[0].written for f in report.fusions] == [10, 10], report.fusions
        print(ducho_fast.load({str(artifacts[1])!r}).embed(["hello"]).shape)
        blocked = [m for m in sys.modules if m.split(".")[0] in Block.names]
        assert not blocked, blocked
    """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 384)"


def test_export_without_torch_gives_install_hint(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text(
        yaml.safe_dump(
            visual_config(
                tmp_path, {"model_name": "resnet18", "output_layers": "avgpool"}, tmp_path / "store"
            )
        )
    )
    proc = run_blocked(
        f"""
        import ducho_fast
        from ducho_fast.errors import MissingExtraError
        try:
            ducho_fast.export({str(path)!r})
        except MissingExtraError as e:
            print(e)
    """,
        tmp_path,
    )
    assert "pip install 'ducho-fast[torch]'" in proc.stdout, proc.stderr


def test_the_packages_names_follow_their_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name kept by the package the first time it was used, while a test had replaced it in
    # its module, stayed replaced for every later test.
    import ducho_fast
    from ducho_fast import api

    original = api.extract
    monkeypatch.setattr(api, "extract", lambda *_: "replaced")
    assert ducho_fast.extract({}) == "replaced"
    monkeypatch.undo()
    assert ducho_fast.extract is original
