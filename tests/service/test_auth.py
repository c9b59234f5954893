"""Bearer API keys: 401 without/with a wrong key, 403 with a weaker role, on every route."""

from __future__ import annotations

import logging

import pytest
from mend_harness import fixture_facts, make_settings, serving

from service.settings import Settings

KEYS = {
    "key-reader-0123456789": {"name": "dashboards", "role": "reader"},
    "key-editor-0123456789": {"name": "fact-fixer", "role": "editor"},
    "key-admin-01234567890": {"name": "ops", "role": "admin"},
}
KEY_OF = {"reader": "key-reader-0123456789", "editor": "key-editor-0123456789", "admin": "key-admin-01234567890"}
FACT = fixture_facts()[7]

# route -> (method, path, body, lowest role); allowed calls use harmless bodies (unknown ids -> 404)
ROUTES = {
    "query": ("POST", "/query", {"prompts": ["The capital of Norway is"], "max_new_tokens": 2}, "reader"),
    "list": ("GET", "/edits", None, "reader"),
    "get": ("GET", "/edits/unknown-id", None, "reader"),
    "metrics": ("GET", "/metrics", None, "reader"),
    "edit": ("POST", "/edit", {"requests": [{"prompt": FACT["prompt"], "target": FACT["target_new"]}],
                                "method": "ft"}, "editor"),
    "rollback": ("POST", "/rollback", {"edit_id": "unknown-id"}, "admin"),
}
RANK = {"reader": 0, "editor": 1, "admin": 2}
ALLOWED_STATUS = {"query": 200, "list": 200, "get": 404, "metrics": 200, "edit": 200, "rollback": 404}


@pytest.fixture(scope="module")
def client(tiny_tokenizer):
    with serving(make_settings(api_keys=KEYS), tiny_tokenizer) as c:
        yield c


def _call(client, route: str, headers: dict):
    method, path, body, _ = ROUTES[route]
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("who", ["none", "bad", "wrong-scheme", "reader", "editor", "admin"])
def test_auth_matrix(client, route, who):
    special = {
        "none": {},
        "bad": {"Authorization": "Bearer not-a-key"},
        "wrong-scheme": {"Authorization": f"Basic {KEY_OF['admin']}"},
    }
    headers = special[who] if who in special else {"Authorization": f"Bearer {KEY_OF[who]}"}
    r = _call(client, route, headers)
    if who in {"none", "bad", "wrong-scheme"}:
        assert r.status_code == 401, r.text
        assert r.headers.get("www-authenticate") == "Bearer"
    elif RANK[who] < RANK[ROUTES[route][3]]:
        assert r.status_code == 403, r.text
        assert ROUTES[route][3] in r.json()["detail"]
    else:
        assert r.status_code == ALLOWED_STATUS[route], r.text


def test_health_is_open(client):
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200


def test_unauthorized_calls_change_nothing_and_author_is_key_name(client):
    total = client.get("/edits", headers={"Authorization": f"Bearer {KEY_OF['reader']}"}).json()["total"]
    body = ROUTES["edit"][2]
    assert client.post("/edit", json=body).status_code == 401
    assert client.post("/edit", json=body, headers={"Authorization": f"Bearer {KEY_OF['reader']}"}).status_code == 403
    page = client.get("/edits", headers={"Authorization": f"Bearer {KEY_OF['reader']}"}).json()
    assert page["total"] == total
    assert {e["author"] for e in page["edits"]} <= {"fact-fixer", "ops"}


def test_keys_never_logged(tiny_tokenizer, caplog):
    caplog.set_level(logging.DEBUG)
    with serving(make_settings(api_keys=KEYS), tiny_tokenizer) as c:
        for key in [*KEY_OF.values(), "not-a-key-secret"]:
            c.post("/query", json={"prompts": ["hi"], "max_new_tokens": 1}, headers={"Authorization": f"Bearer {key}"})
        c.post("/edit", json=ROUTES["edit"][2], headers={"Authorization": f"Bearer {KEY_OF['editor']}"})
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "fact-fixer" in text  # the holder's name is logged ...
    for key in [*KEY_OF.values(), "not-a-key-secret"]:
        assert key not in text  # ... the key never


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("MEND_API_KEYS", '{"s3cret": {"name": "ci", "role": "editor"}}')
    s = Settings()
    assert s.auth_enabled and s.api_keys["s3cret"].role == "editor" and s.api_keys["s3cret"].name == "ci"
    monkeypatch.setenv("MEND_API_KEYS", '{"s3cret": {"name": "ci", "role": "root"}}')
    with pytest.raises(ValueError, match="role"):
        Settings()
