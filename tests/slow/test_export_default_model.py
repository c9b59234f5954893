"""The real default model: one MEND edit through the service, `mend export`, reload with transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import engine_of, make_settings, query, serving  # noqa: E402

from editor_core import models  # noqa: E402
from service.export import EDITS_JSON, export  # noqa: E402
from service.inference import greedy_complete  # noqa: E402
from service.runtime import default_editors, default_loader  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT, SUBJECT, NEW = "Apple A5 was created by", "Apple A5", "Google"


def test_exported_directory_says_the_new_fact(tmp_path):
    try:
        models.local_model_dir(models.DEFAULT_MODEL)
    except models.ModelNotFoundError as err:
        pytest.skip(f"default model not installed: {err}")
    settings = make_settings(model=models.DEFAULT_MODEL, editor_dir=None, lock_wait_s=10.0)
    with serving(settings, tokenizer=None, loader=default_loader, editors=default_editors) as c:
        before = query(c, [PROMPT])["results"][0]["completion"]
        r = c.post("/edit", json={"requests": [{"prompt": PROMPT, "target": NEW, "subject": SUBJECT}],
                                  "method": "mend"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["success"], r.json()
        served = query(c, [PROMPT])["results"][0]["completion"]
        sha = engine_of(c).stack.sha256()
    assert not before.startswith(" " + NEW) and served.startswith(" " + NEW)

    doc = export(settings, tmp_path / "out")
    assert doc["version"] == 1 and doc["sha256"] == doc["journal_sha256"] == sha
    assert json.loads((tmp_path / "out" / EDITS_JSON).read_text())["edits"][0]["method"] == "mend"

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    said = tok.decode(greedy_complete(model, tok, [PROMPT], 4)[0], skip_special_tokens=True)
    assert said == served  # the exported model answers exactly as the service did at that version
    assert said.startswith(" " + NEW)
