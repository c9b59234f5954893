"""Scenario 6: every route x every role x no / invalid / wrong-scheme key, against a real `mend serve`
with keys configured and DEBUG logging; then the whole log is searched for every key string.

The route table must list every route the app has (a new route without an entry fails the run).

    python tests/reliability/scenarios/auth.py
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
from harness import RedisProc, ServiceProc, edit_body, scenario_main, tiny_model_dir  # noqa: E402

KEYS = {
    "rk-" + "r" * 29: {"name": "dashboards", "role": "reader"},
    "ek-" + "e" * 29: {"name": "fact-fixer", "role": "editor"},
    "ak-" + "a" * 29: {"name": "ops", "role": "admin"},
}
KEY_OF = {info["role"]: key for key, info in KEYS.items()}
INVALID = "ik-" + "i" * 29  # a well-formed key nobody holds
NEAR_MISS = KEY_OF["admin"][:-1] + "b"  # the admin key with its last character changed
RANK = {"public": -1, "reader": 0, "editor": 1, "admin": 2}
# (method, path) -> (lowest role, body, status when allowed)
ROUTES = {
    ("GET", "/health/live"): ("public", None, 200),
    ("GET", "/health/ready"): ("public", None, 200),
    ("GET", "/openapi.json"): ("public", None, 200),
    ("GET", "/docs"): ("public", None, 200),
    ("GET", "/docs/oauth2-redirect"): ("public", None, 200),
    ("GET", "/redoc"): ("public", None, 200),
    ("POST", "/query"): ("reader", {"prompts": ["The capital of Norway is"], "max_new_tokens": 2}, 200),
    ("GET", "/edits"): ("reader", None, 200),
    ("GET", "/edits/{edit_id}"): ("reader", None, 404),
    ("GET", "/metrics"): ("reader", None, 200),
    ("GET", "/events"): ("reader", None, 200),  # called with max_s=1: a stream ends after max_s
    ("POST", "/edit"): ("editor", edit_body(3), 200),
    ("POST", "/rollback"): ("admin", {"edit_id": "no-such-edit"}, 404),
}
CALLERS = ["none", "invalid", "near-miss", "wrong-scheme", "empty-bearer", "reader", "editor", "admin"]


def headers_of(who: str) -> dict:
    special = {
        "none": {},
        "invalid": {"Authorization": f"Bearer {INVALID}"},
        "near-miss": {"Authorization": f"Bearer {NEAR_MISS}"},
        "wrong-scheme": {"Authorization": f"Basic {KEY_OF['admin']}"},
        "empty-bearer": {"Authorization": "Bearer"},
    }
    return special[who] if who in special else {"Authorization": f"Bearer {KEY_OF[who]}"}


def expected(role: str, who: str, allowed: int) -> int:
    if role == "public":
        return allowed
    if who not in RANK:
        return 401
    return allowed if RANK[who] >= RANK[role] else 403


def run(workdir: Path | None = None) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-auth-"))
    red = RedisProc(workdir / "redis").start()
    svc = ServiceProc(workdir, tiny_model_dir(workdir), red.url, f"auth-{uuid.uuid4().hex[:6]}",
                      api_keys=KEYS, log_level="DEBUG")
    problems: list[str] = []
    calls = 0
    try:
        svc.start()
        svc.wait_ready()
        spec = httpx.get(f"{svc.base}/openapi.json").json()
        listed = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        listed |= {("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")}
        if listed != set(ROUTES):
            problems.append(f"route table out of date: app has {sorted(listed ^ set(ROUTES))} differently")
        with httpx.Client(base_url=svc.base, timeout=60) as http:
            for (method, path), (role, body, allowed) in ROUTES.items():
                for who in CALLERS:
                    url = path.replace("{edit_id}", "no-such-edit")
                    if path == "/events":
                        url += "?max_s=1"
                    r = http.request(method, url, json=body, headers=headers_of(who))
                    calls += 1
                    want = expected(role, who, allowed)
                    if r.status_code != want:
                        problems.append(f"{method} {path} as {who}: {r.status_code}, expected {want}: {r.text[:150]}")
                    if want == 401 and r.headers.get("www-authenticate") != "Bearer":
                        problems.append(f"{method} {path} as {who}: 401 without WWW-Authenticate: Bearer")
                    if any(k in r.text for k in (*KEYS, INVALID, NEAR_MISS)):
                        problems.append(f"{method} {path} as {who}: a key string is echoed in the response")
            edits = http.get("/edits", headers=headers_of("reader")).json()["edits"]
            authors = sorted({e["author"] for e in edits})
            if authors != ["fact-fixer", "ops"]:
                problems.append(f"journal authors {authors}, expected the key holders' names")
    finally:
        svc.stop()
        red.stop()
    log = svc.log_text()
    leaked = [name for name, k in [*((f"{i['role']} key", k) for k, i in KEYS.items()),
                                   ("invalid key", INVALID), ("near-miss key", NEAR_MISS)] if k in log]
    if leaked:
        problems.append(f"log contains: {leaked}")
    return {"routes": len(ROUTES), "callers": len(CALLERS), "calls": calls, "log_lines": log.count("\n"),
            "keys_found_in_log": leaked, "problems": problems, "workdir": str(workdir)}


def main() -> int:
    return scenario_main("auth matrix", run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
