"""`mend export` against a real journal (real redis-server) written by the service on a tiny llama.

The model lives in a local directory that both the service and the export load (the default loader),
so the export finds the service's journal by fingerprint exactly as it would in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import peft
import pytest
import redis
import torch
from mend_harness import edit, engine_of, fixture_facts, make_settings, make_tiny_llama, serving
from transformers import AutoModelForCausalLM

from editor_core.export import stacked_factors
from editor_core.fingerprint import targets_sha256
from service.cli import main
from service.export import EDITS_JSON, ExportError, export
from service.runtime import default_loader

FACTS = fixture_facts()
PEFT_ATOL = 1e-5  # fp32 logits, adapter (W x + B A x) against rebuilt weights ((W + B A) x); seen ~1e-6


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


def load_dir(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def history(tiny_tokenizer, tmp_path_factory) -> Iterator[dict]:
    """A journal with ft, mend, rollback, ft (versions 1-4) and the in-process logits at every version."""
    model_dir = tmp_path_factory.mktemp("tiny-model")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    settings = make_settings(model=str(model_dir))
    # the export runs at the settings' thread count (as the service does); a sum split over another number of
    # threads rounds differently, so the logits it is compared with bit for bit are taken at the same count
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    ids = tiny_tokenizer([FACTS[0]["prompt"] + " " + FACTS[0]["target_new"]], return_tensors="pt").input_ids
    seen = {}
    with serving(settings, tiny_tokenizer, loader=default_loader) as c:
        eng = engine_of(c)

        def record():
            seen[eng.version] = {"logits": logits_of(eng.model, ids), "sha": eng.stack.sha256(),
                                 "active": eng.stack.active_ids}

        record()
        first = edit(c, FACTS[0]["prompt"], FACTS[0]["target_new"], method="ft")["edit_id"]
        record()
        edit(c, FACTS[1]["prompt"], FACTS[1]["target_new"], method="mend")
        record()
        assert c.post("/rollback", json={"edit_id": first}).status_code == 200
        record()
        edit(c, FACTS[2]["prompt"], FACTS[2]["target_new"], method="ft")
        record()
        fingerprint = eng.stack.fingerprint
    assert sorted(seen) == [0, 1, 2, 3, 4]
    yield {"settings": settings, "ids": ids, "seen": seen, "model_dir": model_dir, "fingerprint": fingerprint}
    torch.set_num_threads(previous)


def cli(history, *args: str) -> int:
    s = history["settings"]
    return main(["export", "--model", s.model, "--redis-url", s.redis_url, "--redis-prefix", s.redis_prefix,
                 *args])


@pytest.mark.parametrize("version", [0, 1, 3, 4])
def test_export_reloads_bit_equal_with_the_journal_sha256(history, version, tmp_path):
    doc = export(history["settings"], tmp_path / "out", version=version)
    seen = history["seen"][version]
    loaded = load_dir(tmp_path / "out")
    assert torch.equal(logits_of(loaded, history["ids"]), seen["logits"])  # bit for bit in fp32

    written = json.loads((tmp_path / "out" / EDITS_JSON).read_text())
    assert written == doc and written["version"] == version and written["journal_head_version"] == 4
    assert written["sha256"] == seen["sha"]
    if version:
        assert written["journal_sha256"] == seen["sha"]
    assert [e["edit_id"] for e in written["edits"]] == seen["active"]
    assert all(e["requests"] and e["method"] in ("ft", "mend") for e in written["edits"])
    # the reloaded directory's targets hash to what the journal recorded
    from editor_core.targets import resolve_targets

    assert targets_sha256(loaded, resolve_targets(loaded)) == seen["sha"]
    assert written["fingerprint"] == history["fingerprint"]


def test_head_is_the_default_and_rollbacks_are_listed(history, tmp_path):
    assert cli(history, "--out", str(tmp_path / "out")) == 0
    doc = json.loads((tmp_path / "out" / EDITS_JSON).read_text())
    assert doc["version"] == 4 and len(doc["edits"]) == 2 and len(doc["rolled_back"]) == 1
    assert doc["rolled_back"][0]["version"] == 3
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    assert all(p.stat().st_mode & 0o644 == 0o644 for p in (tmp_path / "out").iterdir())  # not safetensors' 0600


def test_peft_adapter_on_the_base_gives_the_version_logits(history, tmp_path):
    assert cli(history, "--format", "peft", "--version", "2", "--out", str(tmp_path / "a")) == 0
    doc = json.loads((tmp_path / "a" / EDITS_JSON).read_text())
    assert doc["kind"] == "peft" and doc["sha256"] == history["seen"][2]["sha"]
    assert all(a["rank"] == a["exact_rank"] and a["rel_frobenius_error"] == 0.0 for a in doc["adapter"].values())
    base = load_dir(history["model_dir"])
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    want = history["seen"][2]["logits"]
    torch.testing.assert_close(logits_of(adapted, history["ids"]), want, atol=PEFT_ATOL, rtol=0)
    assert not torch.allclose(history["seen"][0]["logits"], want, atol=1e-3)  # the edits do move the logits


def test_truncated_adapter_prints_and_stores_its_error(history, tmp_path, caplog):
    caplog.set_level("INFO")
    assert cli(history, "--format", "peft", "--max-rank", "4", "--out", str(tmp_path / "a")) == 0
    doc = json.loads((tmp_path / "a" / EDITS_JSON).read_text())
    readme = (tmp_path / "a" / "README.md").read_text()
    base = load_dir(history["model_dir"])
    base_w = {n: base.get_submodule(n).weight.detach().clone() for n in doc["adapter"]}
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload()
    from editor_core.delta import EditDelta

    client = redis.Redis.from_url(history["settings"].redis_url)
    ns = f"{history['settings'].redis_prefix}:{doc['fingerprint']}"
    deltas = [EditDelta.from_bytes(client.get(f"{ns}:delta:{e['edit_id']}")) for e in doc["edits"]]
    for name, a in doc["adapter"].items():
        assert a["rank"] == min(4, a["exact_rank"])
        assert f"{a['rel_frobenius_error']:.3e}" in readme and name in caplog.text
        u, v = stacked_factors(deltas, name)
        exact = u.t() @ v  # (d_out, d_in)
        served = merged.get_submodule(name).weight.detach() - base_w[name]
        assert float((exact - served).norm() / exact.norm()) == pytest.approx(a["rel_frobenius_error"], abs=1e-5)
    assert any(a["rel_frobenius_error"] > 0 for a in doc["adapter"].values())


# ---- refusals: a clear message, a non-zero exit, nothing written ------------------------------
def _refused(history, out: Path, caplog, *args: str, match: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir())
    assert cli(history, "--out", str(out), *args) == 2
    assert match in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no partial directory left behind


def test_unknown_version_is_refused(history, tmp_path, caplog):
    _refused(history, tmp_path / "out", caplog, "--version", "9", match="unknown version 9")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_needs_force_and_force_replaces_only_an_export(history, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(history, out, caplog, match="exists and is not empty")
    _refused(history, out, caplog, "--force", match="holds no edits.json")
    assert (out / "notes.txt").read_text() == "mine"

    assert cli(history, "--out", str(tmp_path / "exp"), "--version", "1") == 0
    assert cli(history, "--out", str(tmp_path / "exp"), "--version", "2") == 2
    assert cli(history, "--out", str(tmp_path / "exp"), "--version", "2", "--force") == 0
    assert json.loads((tmp_path / "exp" / EDITS_JSON).read_text())["version"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up


def test_missing_journal_entries_are_refused(history, tmp_path, caplog):
    s = history["settings"]
    client = redis.Redis.from_url(s.redis_url)
    ns = f"{s.redis_prefix}:{history['fingerprint']}"
    # copy the journal to a scratch prefix, then damage the copy
    scratch = s.redis_prefix + "-damaged"
    for key in client.scan_iter(match=f"{ns}:*"):
        client.copy(key, key.decode().replace(s.redis_prefix, scratch, 1))
    dns = f"{scratch}:{history['fingerprint']}"
    damaged = dict(history, settings=s.model_copy(update={"redis_prefix": scratch}))
    active = json.loads(client.get(f"{dns}:head"))["edit_id"]  # the last op's edit, active at 4

    client.delete(f"{dns}:delta:{active}")
    _refused(damaged, tmp_path / "out", caplog, match="no delta blob for active edits")
    assert cli(damaged, "--out", str(tmp_path / "ok"), "--version", "3") == 0  # earlier versions still export

    client.xdel(f"{dns}:ops", "2-0")
    _refused(damaged, tmp_path / "out", caplog, "--version", "3", match="version 2 is not in the stream")
    assert cli(damaged, "--out", str(tmp_path / "ok1"), "--version", "1") == 0


def test_no_journal_for_this_model_is_refused(history, tmp_path, caplog):
    other = dict(history, settings=history["settings"].model_copy(update={"redis_prefix": "nobody-here"}))
    _refused(other, tmp_path / "out", caplog, match="no journal for model")
    assert cli(other, "--out", str(tmp_path / "base"), "--version", "0") == 0  # the base is still exportable


def test_empty_adapter_and_bad_max_rank_are_refused(history, tmp_path, caplog):
    _refused(history, tmp_path / "out", caplog, "--format", "peft", "--version", "0", match="no active edits")
    with pytest.raises(ExportError, match="--max-rank"):
        export(history["settings"], tmp_path / "out", fmt="hf", max_rank=2)


def test_embedded_data_dir_live_or_not(tiny_tokenizer, tmp_path, history):
    settings = make_settings(redis_url=None, data_dir=tmp_path / "var", model=history["settings"].model)
    with serving(settings, tiny_tokenizer, loader=default_loader) as c:
        edit(c, FACTS[3]["prompt"], FACTS[3]["target_new"], method="ft")
        sha = engine_of(c).stack.sha256()
        live = export(settings, tmp_path / "live")  # through the service's own redis-server
    offline = export(settings, tmp_path / "offline")  # a private redis-server on the AOF, stopped after
    assert live["version"] == offline["version"] == 1 and live["sha256"] == offline["sha256"] == sha
    assert not (tmp_path / "var" / "redis-server.pid").exists() or not _alive(tmp_path / "var")
    with pytest.raises(ExportError, match="no journal in"):
        export(settings.model_copy(update={"data_dir": tmp_path / "nothing"}), tmp_path / "x")
    assert not (tmp_path / "nothing").exists()


def _alive(data_dir: Path) -> bool:
    from service.export import live_embedded_url

    return live_embedded_url(data_dir) is not None
