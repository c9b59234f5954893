"""The GGUF conversion cache of ``editor_core.models``: safe when two processes convert at once."""

from __future__ import annotations

import pytest
import transformers

from editor_core import models


@pytest.fixture
def conversion(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    """(a GGUF path, the cache directory to convert it into): transformers' GGUF reads are patched to
    return the tiny model and tokenizer, so no GGUF file is parsed."""
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read")
    out = tmp_path / "cache" / "m-abc"
    out.parent.mkdir()
    return gguf, out


def test_convert_leaves_a_complete_cache_and_no_scratch(conversion):
    gguf, out = conversion
    models._convert_gguf(gguf, out)
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["m-abc"]


def test_convert_when_another_process_finished_first(conversion):
    # Two benchmark jobs on a fresh machine both find no cache and convert; the slower one must not
    # fail on the finished directory, and must not leave its scratch copy behind.
    gguf, out = conversion
    (out.parent / "m-abc.partial").mkdir()  # what a crashed older version left; not ours to use
    models._convert_gguf(gguf, out)  # the first process
    first = (out / "model.safetensors").stat().st_mtime_ns
    models._convert_gguf(gguf, out)  # the second, finishing later
    assert (out / "model.safetensors").stat().st_mtime_ns == first  # the finished cache is not replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-abc", "m-abc.partial"]


def test_convert_failure_without_a_finished_cache_is_raised(conversion):
    gguf, out = conversion
    out.mkdir()
    (out / "stray").write_text("a directory that is not a model")  # rename onto it fails, no config.json
    with pytest.raises(OSError):
        models._convert_gguf(gguf, out)
