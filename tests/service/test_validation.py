"""Bad input -> 4xx naming the field; nothing applied, nothing journaled."""

from __future__ import annotations

import json

import pytest
from mend_harness import engine_of, make_settings, serving

LIMITS = dict(max_prompt_chars=50, max_requests_per_edit=2, max_prompts_per_query=3, max_new_tokens=8,
              max_candidates=2, max_rephrases=1, max_body_bytes=4096, max_page_size=10)
OK_REQ = {"prompt": "The capital of Norway is", "target": "Bergen"}
LONG = "x" * 51

# (path, body, field that must be named in the error)
CASES = [
    ("/edit", {"requests": []}, "requests"),
    ("/edit", {}, "requests"),
    ("/edit", {"requests": [OK_REQ] * 3, "method": "ft"}, "requests"),
    ("/edit", {"requests": [{"prompt": "", "target": "Bergen"}], "method": "ft"}, "prompt"),
    ("/edit", {"requests": [{"prompt": "   ", "target": "Bergen"}], "method": "ft"}, "prompt"),
    ("/edit", {"requests": [{"prompt": LONG, "target": "Bergen"}], "method": "ft"}, "prompt"),
    ("/edit", {"requests": [{"prompt": "ok", "target": LONG}], "method": "ft"}, "target"),
    ("/edit", {"requests": [{"prompt": "ok", "target": ""}], "method": "ft"}, "target"),
    ("/edit", {"requests": [{"prompt": 5, "target": "Bergen"}], "method": "ft"}, "prompt"),
    ("/edit", {"requests": [{"target": "Bergen"}], "method": "ft"}, "prompt"),
    ("/edit", {"requests": "The capital", "method": "ft"}, "requests"),
    ("/edit", {"requests": [OK_REQ], "method": "serac"}, "method"),
    ("/edit", {"requests": [{"prompt": "The capital of Norway is", "target": "Bergen", "subject": "Sweden"}],
               "method": "ft"}, "subject"),
    ("/edit", {"requests": [{"prompt": "The capital of Norway is", "target": "Bergen", "subject": " "}],
               "method": "ft"}, "subject"),
    ("/edit", {"requests": [OK_REQ], "method": 1}, "method"),
    ("/edit", {"requests": [OK_REQ | {"rephrases": ["a", "b"]}], "method": "ft"}, "rephrases"),
    ("/edit", {"requests": [OK_REQ | {"rephrases": [LONG]}], "method": "ft"}, "rephrases"),
    ("/edit", {"requests": [OK_REQ], "method": "ft", "surprise": 1}, "surprise"),
    ("/edit", {"requests": [OK_REQ], "method": "ft", "idempotency_key": ""}, "idempotency_key"),
    ("/query", {"prompts": []}, "prompts"),
    ("/query", {"prompts": "hi"}, "prompts"),
    ("/query", {"prompts": [1]}, "prompts"),
    ("/query", {"prompts": [""]}, "prompts"),
    ("/query", {"prompts": ["a", "b", "c", "d"]}, "prompts"),
    ("/query", {"prompts": [LONG]}, "prompts"),
    ("/query", {"prompts": ["hi"], "max_new_tokens": 9}, "max_new_tokens"),
    ("/query", {"prompts": ["hi"], "max_new_tokens": 0}, "max_new_tokens"),
    ("/query", {"prompts": ["hi"], "max_new_tokens": "4"}, "max_new_tokens"),
    ("/query", {"prompts": ["hi"], "candidates": ["a", "b", "c"]}, "candidates"),
    ("/query", {"prompts": ["hi"], "candidates": [""]}, "candidates"),
    ("/rollback", {}, "edit_id"),
    ("/rollback", {"edit_id": 3}, "edit_id"),
]


@pytest.fixture(scope="module")
def client(tiny_tokenizer):
    with serving(make_settings(**LIMITS), tiny_tokenizer) as c:
        yield c


def _state(client):
    eng = engine_of(client)
    return eng.version, eng.stack.sha256(), client.get("/edits").json()["total"]


@pytest.mark.parametrize(("path", "body", "field"), CASES, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(CASES)])
def test_bad_input_is_4xx_naming_the_field_and_changes_nothing(client, path, body, field):
    before = _state(client)
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in [str(x) for x in d["loc"]] or field in d["msg"] for d in detail), detail
    assert _state(client) == before


def test_malformed_json(client):
    before = _state(client)
    r = client.post("/edit", content=b'{"requests": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"
    assert _state(client) == before


def test_json_sent_as_a_form_is_415_saying_what_to_send(client):
    # what `curl -d '{...}'` sends without -H 'content-type: application/json'
    before = _state(client)
    body = json.dumps({"requests": [OK_REQ], "method": "ft"})
    r = client.post("/edit", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert "application/json" in r.json()["detail"] and "x-www-form-urlencoded" in r.json()["detail"]
    assert _state(client) == before
    r = client.post("/query", content=json.dumps({"prompts": ["hi"]}), headers={"content-type": "text/plain"})
    assert r.status_code == 415
    ok = client.post("/query", content=json.dumps({"prompts": ["hi"], "max_new_tokens": 1}),
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_oversize_body_is_413(client):
    before = _state(client)
    body = json.dumps({"requests": [{"prompt": "p" * 5000, "target": "t"}], "method": "ft"})
    r = client.post("/edit", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"][0]["msg"]
    assert _state(client) == before


def test_page_size_limit(client):
    r = client.get("/edits", params={"limit": 11})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]
    assert client.get("/edits", params={"offset": -1}).status_code == 422


def test_a_valid_request_still_works_after_all_that(client):
    r = client.post("/edit", json={"requests": [OK_REQ], "method": "ft"})
    assert r.status_code == 200 and r.json()["version"] == 1
