"""The GGUF conversion cache of ``editor_core.models``: safe when two processes convert at once."""

from __future__ import annotations

import pytest
import transformers

from editor_core import models


def _patch_gguf_loaders(monkeypatch, model, tokenizer):
    """Make transformers' GGUF reads return the tiny model and tokenizer (no GGUF file needed)."""
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)


def test_convert_leaves_a_complete_cache_and_no_scratch(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    _patch_gguf_loaders(monkeypatch, tiny_llama, tiny_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read")
    out = tmp_path / "cache" / "m-abc"
    out.parent.mkdir()
    models._convert_gguf(gguf, out)
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m-abc"]


def test_convert_when_another_process_finished_first(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    # Two benchmark jobs on a fresh machine both find no cache and convert; the slower one must not
    # fail on the finished directory, and must not leave its scratch copy behind.
    _patch_gguf_loaders(monkeypatch, tiny_llama, tiny_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read")
    out = tmp_path / "cache" / "m-abc"
    out.parent.mkdir()
    (out.parent / "m-abc.partial").mkdir()  # what a crashed older version left; not ours to use
    models._convert_gguf(gguf, out)  # the first process
    first = (out / "model.safetensors").stat().st_mtime_ns
    models._convert_gguf(gguf, out)  # the second, finishing later
    assert (out / "model.safetensors").stat().st_mtime_ns == first  # the finished cache is not replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-abc", "m-abc.partial"]


def test_convert_failure_without_a_finished_cache_is_raised(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    _patch_gguf_loaders(monkeypatch, tiny_llama, tiny_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read")
    out = tmp_path / "cache" / "m-abc"
    out.mkdir(parents=True)
    (out / "stray").write_text("a directory that is not a model")  # rename onto it fails, no config.json
    with pytest.raises(OSError):
        models._convert_gguf(gguf, out)
