"""GET /events (server-sent events following the journal's stream), the /edits filters and the console's
static files and headers, without a browser: a tiny model, a real redis-server, the app in-process."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import fixture_facts, make_settings, serving  # noqa: E402

from service.api.console import CSP  # noqa: E402

FACTS = fixture_facts()
KEYS = {
    "console-reader-key-0123456789": {"name": "dashboards", "role": "reader"},
    "console-editor-key-0123456789": {"name": "fact-fixer", "role": "editor"},
    "console-admin-key-01234567890": {"name": "ops", "role": "admin"},
}
READER = {"Authorization": "Bearer console-reader-key-0123456789"}
EDITOR = {"Authorization": "Bearer console-editor-key-0123456789"}
ADMIN = {"Authorization": "Bearer console-admin-key-01234567890"}
CONSOLE_DIR = Path(__file__).resolve().parents[2] / "service" / "console"


def parse_sse(text: str) -> list[dict]:
    """Frames of an event stream: {"event", "id", "data", "retry", "comment"} per blank-line-separated block."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        frame: dict = {"data": []}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                frame["data"].append(value)
            else:
                frame[field] = value
        frame["data"] = json.loads("\n".join(frame["data"])) if frame["data"] else None
        frames.append(frame)
    return frames


def ops_of(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f.get("event") == "op"]


@pytest.fixture(scope="module")
def client(tiny_tokenizer):
    with serving(make_settings(api_keys=KEYS), tiny_tokenizer) as c:
        yield c


@pytest.fixture(scope="module")
def journal(client):
    """Three edits (two authors, two methods) and a rollback of the first: versions 1..4."""
    def edit(i: int, headers: dict, method: str, subject: str | None = None) -> dict:
        req = {"prompt": FACTS[i]["prompt"], "target": FACTS[i]["target_new"]}
        if subject:
            req["subject"] = subject
        r = client.post("/edit", json={"requests": [req], "method": method}, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    a = edit(7, EDITOR, "ft", subject="Norway")  # The capital of Norway is -> Bergen
    b = edit(0, ADMIN, "ft")
    c = edit(1, EDITOR, "mend")
    rb = client.post("/rollback", json={"edit_id": a["edit_id"]}, headers=ADMIN)
    assert rb.status_code == 200, rb.text
    return {"a": a, "b": b, "c": c, "rollback": rb.json()}


def read_events(client, headers=READER, **params) -> tuple[int, dict, list[dict]]:
    params.setdefault("max_s", 1)
    with client.stream("GET", "/events", params=params, headers=headers) as r:
        text = "".join(r.iter_text())
        return r.status_code, dict(r.headers), parse_sse(text) if r.status_code == 200 else json.loads(text)


def test_events_backlog_framing_and_payloads(client, journal):
    status, headers, frames = read_events(client, after=0)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert frames[0] == {"retry": "1000", "data": None}
    assert frames[1]["event"] == "head" and frames[1]["data"] == {"version": 4, "after": 0}
    ops = ops_of(frames)
    assert [o["id"] for o in ops] == ["1", "2", "3", "4"]
    first = ops[0]["data"]
    assert first["op"] == "edit" and first["version"] == 1 and first["edit_id"] == journal["a"]["edit_id"]
    assert first["author"] == "fact-fixer" and first["method"] == "ft"
    assert first["requests"] == [{"prompt": FACTS[7]["prompt"], "target": FACTS[7]["target_new"],
                                  "subject": "Norway", "rephrases": []}]
    assert first["results"][0]["success"] is True and len(first["sha256"]) == 64
    last = ops[3]["data"]
    assert last["op"] == "rollback" and last["edit_id"] == journal["a"]["edit_id"] and last["author"] == "ops"
    assert last["dependents"] == [journal["b"]["edit_id"], journal["c"]["edit_id"]]
    assert frames[-1].get("comment") == "keepalive"  # the stream ended after max_s, quietly


def test_events_resume_after_and_last_event_id(client, journal):
    _, _, frames = read_events(client, after=2)
    assert [o["id"] for o in ops_of(frames)] == ["3", "4"]
    _, _, frames = read_events(client, headers=READER | {"Last-Event-ID": "3"})
    assert [o["id"] for o in ops_of(frames)] == ["4"]
    _, _, frames = read_events(client)  # neither: only what comes next
    assert frames[1]["data"] == {"version": 4, "after": 4} and not ops_of(frames)
    _, _, frames = read_events(client, after=99)  # a later journal than this one: resume at its head
    assert frames[1]["data"] == {"version": 4, "after": 4} and not ops_of(frames)
    _, _, frames = read_events(client, headers=READER | {"Last-Event-ID": "garbage"})
    assert frames[1]["data"]["after"] == 4


def test_events_deliver_a_new_op_live(client, journal):
    got: dict = {}
    opened = threading.Event()

    def follow():
        with client.stream("GET", "/events", params={"max_s": 8}, headers=READER) as r:
            buffer = ""
            for chunk in r.iter_text():
                buffer += chunk
                if "event: head" in buffer:
                    opened.set()
                ops = ops_of(parse_sse(buffer.rsplit("\n\n", 1)[0] + "\n\n"))
                if ops:
                    got["op"], got["at"] = ops[0], time.monotonic()
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert opened.wait(10)
    r = client.post("/edit", json={"requests": [{"prompt": FACTS[2]["prompt"], "target": FACTS[2]["target_new"]}],
                                   "method": "ft"}, headers=EDITOR)
    assert r.status_code == 200, r.text
    acked = time.monotonic()
    reader.join(10)
    assert got["op"]["id"] == str(r.json()["version"]) and got["op"]["data"]["edit_id"] == r.json()["edit_id"]
    assert got["at"] - acked < 3.0  # pushed at once by the blocking XREAD (whose timeout is 5 s)


def test_events_auth_and_parameters(client, journal):
    status, headers, body = read_events(client, headers={})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    key = READER["Authorization"].split()[1]
    status, _, body = read_events(client, headers={}, key=key, token=key, api_key=key)
    assert status == 401  # keys in the URL are not accepted (they end up in logs)
    status, _, _ = read_events(client, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    for bad in ({"after": -1}, {"max_s": 0}, {"max_s": 1000}, {"after": "x"}):
        status, _, body = read_events(client, **bad)
        assert status == 422, (bad, body)


def test_events_in_openapi(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {p["name"] for p in op["parameters"]} == {"after", "max_s"}
    assert "/console" not in spec["paths"]


def test_edits_filters(client, journal):
    def listing(**params):
        r = client.get("/edits", params=params, headers=READER)
        assert r.status_code == 200, r.text
        return r.json()

    a, b, c = (journal[k]["edit_id"] for k in "abc")
    assert [e["edit_id"] for e in listing(q="norway")["edits"]] == [a]  # subject/prompt, any case
    assert [e["edit_id"] for e in listing(q=FACTS[0]["target_new"].upper())["edits"]] == [b]  # target
    assert listing(author="ops")["total"] == 1 and listing(author="ops")["edits"][0]["edit_id"] == b
    assert [e["edit_id"] for e in listing(method="mend")["edits"]] == [c]
    rolled = listing(status="rolled_back")
    assert rolled["total"] == 1 and rolled["edits"][0]["edit_id"] == a
    active = listing(status="active", order="asc")
    assert [e["edit_id"] for e in active["edits"]][:2] == [b, c]
    after = listing(after_version=2, order="asc")
    assert [e["version"] for e in after["edits"]][:1] == [3]
    paged = listing(status="active", limit=1, offset=1, order="asc")
    assert paged["total"] == active["total"] and [e["edit_id"] for e in paged["edits"]] == [c]
    assert listing(q="no such text anywhere")["total"] == 0
    assert [e["edit_id"] for e in listing(subject=" NORWAY ")["edits"]] == [a]  # the whole subject, any case
    assert listing(subject="Norw")["total"] == 0  # not a substring match: that is q
    plain = listing()  # no filter: the existing behaviour
    assert plain["total"] >= 3 and plain["edits"][0]["version"] > plain["edits"][-1]["version"]
    assert client.get("/edits", params={"status": "deleted"}, headers=READER).status_code == 422


def test_console_page_headers_and_no_inline_code(client):
    r = client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert "frame-ancestors 'none'" in CSP and r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S)
    assert scripts and all(not s.strip() for s in scripts)  # no inline script
    assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", html))
    assert not re.search(r"\son[a-z]+\s*=", html) and " style=" not in html  # no inline handlers or styles
    redirect = client.get("/console/", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "../console"


def test_console_static_files(client):
    names = sorted(p.name for p in CONSOLE_DIR.iterdir() if p.suffix in {".js", ".css", ".svg"})
    assert "console.js" in names and "console.css" in names
    for name in names:
        r = client.get(f"/console/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-security-policy"] == CSP
    assert client.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
    for bad in ("nope.js", "__init__.py", "..%2Fapi%2Fconsole.py", "..%2F..%2Fpyproject.toml"):
        assert client.get(f"/console/static/{bad}").status_code == 404, bad
    # every module import resolves to a served file; nothing writes HTML from strings
    for js in CONSOLE_DIR.glob("*.js"):
        text = js.read_text()
        for target in re.findall(r'from "\./([\w.]+)"', text):
            assert (CONSOLE_DIR / target).is_file(), (js.name, target)
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", text), js.name
        assert "localStorage" not in text, js.name  # the key lives in sessionStorage only


@pytest.mark.parametrize(("headers", "edit_status", "rollback_status"),
                         [(READER, 403, 403), (EDITOR, 422, 403), (ADMIN, 422, 422)])
def test_role_probe_the_console_relies_on(client, journal, headers, edit_status, rollback_status):
    """The console finds a key's role with empty bodies: 403 below the role, else 422 and nothing done."""
    total = client.get("/edits", headers=READER).json()["total"]
    assert client.post("/edit", json={}, headers=headers).status_code == edit_status
    assert client.post("/rollback", json={}, headers=headers).status_code == rollback_status
    assert client.get("/edits", headers=READER).json()["total"] == total
