"""Scenario 4: hostile input against a real `mend serve` with API keys.

Part 1, schemathesis: requests generated from /openapi.json for every operation, in positive
(schema-valid) and negative (schema-violating) mode, each sent with no key, an invalid key, a reader
key and an admin key. Part 2, hand-written: odd unicode, control characters, lone surrogates, a 1 MB
body, deeply nested JSON, wrong/missing content types, malformed JSON, huge numbers.

Holds when: no response is 5xx; the service stays ready; and no request that was refused (any
status but 200) changed the journal (its head is read from Redis before and after every request).

    python tests/reliability/scenarios/hostile.py            # CI size: ~150 generated requests
    python tests/reliability/scenarios/hostile.py --full     # >= 1,000 generated requests
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
from harness import (  # noqa: E402
    RedisProc,
    ServiceProc,
    edit_body,
    percentiles,
    scenario_main,
    tiny_model_dir,
)

KEYS = {"hostile-reader-key-0123456789": {"name": "r", "role": "reader"},
        "hostile-admin-key-01234567890": {"name": "a", "role": "admin"}}
AUTH = {"none": {}, "invalid": {"Authorization": "Bearer not-a-key-0123456789"},
        "reader": {"Authorization": "Bearer hostile-reader-key-0123456789"},
        "admin": {"Authorization": "Bearer hostile-admin-key-01234567890"}}
CI = {"examples": 5}  # per operation x mode x auth: 8 ops x 2 x 4 x 5 = ~300 cases at most
FULL = {"examples": 40}
MAX_BODY = 262144


def manual_cases() -> list[tuple[str, str, str, dict, bytes]]:
    """(name, method, path, headers, raw body) of hand-written hostile requests (admin key)."""
    j = {"Content-Type": "application/json"}
    odd = ["\u202eevil\u202c", "zero\u200bwidth\ufeff", "\U0001f600\U0001f4a9" * 50, "\u0000nul\u0007bel\u001besc",
           "a\r\nInjected-Header: x", "\u0301\u0301\u0301combining", "\udfff", "\ud800lone", "\uffff\ufffe",
           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" * 30, "ǅ" * 999, "\t\n\x0b\x0c\r " * 100 + "x"]
    cases = []
    for i, s in enumerate(odd):
        body = json.dumps({"requests": [{"prompt": s, "target": s, "rephrases": [s]}], "method": "ft"}).encode()
        cases.append((f"edit odd unicode {i}", "POST", "/edit", j, body))
        cases.append((f"query odd unicode {i}", "POST", "/query",
                      j, json.dumps({"prompts": [s], "candidates": [s], "max_new_tokens": 2}).encode()))
    cases.append(("invalid utf-8", "POST", "/query", j, b'{"prompts": ["\xff\xfe\xc3("]}'))
    cases.append(("1 MB body", "POST", "/edit", j,
                  json.dumps({"requests": [{"prompt": "x" * 1_000_000, "target": "y"}]}).encode()))
    cases.append(("1 MB body, no content-length", "POST", "/query", j | {"Transfer-Encoding": "chunked"},
                  b"chunked:" + b'{"prompts": ["' + b"x" * 1_000_000 + b'"]}'))
    cases.append(("1 MB of whitespace", "POST", "/rollback", j, b" " * 1_000_000 + b'{"edit_id": "x"}'))
    for depth in (100, 1000, 100_000):
        nested = "[" * depth + "]" * depth
        cases.append((f"nested lists depth {depth}", "POST", "/edit", j,
                      f'{{"requests": {nested}, "method": "ft"}}'.encode()))
        cases.append((f"nested objects depth {depth}", "POST", "/query", j,
                      ('{"prompts": ["a"], "x": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode()))
    body = json.dumps(edit_body(0)).encode()
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/xml", "application/json; charset=latin-1", "application/jsonx", ""):
        cases.append((f"edit content-type {ct!r}", "POST", "/edit", {"Content-Type": ct} if ct else {}, body))
    cases.append(("form body", "POST", "/edit", {"Content-Type": "application/x-www-form-urlencoded"},
                  b"requests=1&method=ft"))
    for name, raw in [("truncated json", b'{"requests": [{"prompt": "a"'), ("not json", b"\x00\x01\x02"),
                      ("json null", b"null"), ("json list", b"[]"), ("json string", b'"edit"'),
                      ("NaN", b'{"prompts": ["a"], "max_new_tokens": NaN}'),
                      ("huge int", b'{"prompts": ["a"], "max_new_tokens": 1' + b"0" * 5000 + b"}"),
                      ("negative", b'{"prompts": ["a"], "max_new_tokens": -1}'),
                      ("float tokens", b'{"prompts": ["a"], "max_new_tokens": 2.5}'),
                      ("bool tokens", b'{"prompts": ["a"], "max_new_tokens": true}'),
                      ("duplicate keys", b'{"prompts": ["a"], "prompts": 5}'),
                      ("bom", b'\xef\xbb\xbf{"prompts": ["a"]}')]:
        cases.append((name, "POST", "/query", j, raw))
    cases.append(("rollback huge id", "POST", "/rollback", j, json.dumps({"edit_id": "x" * 5000}).encode()))
    cases.append(("edits path traversal", "GET", "/edits/..%2F..%2Fhead", {}, b""))
    cases.append(("edits odd id", "GET", "/edits/%00%ff%fe", {}, b""))
    cases.append(("edits huge offset", "GET", "/edits?offset=99999999999999999999999", {}, b""))
    cases.append(("edits limit 0", "GET", "/edits?limit=0", {}, b""))
    cases.append(("edits negative offset", "GET", "/edits?offset=-1", {}, b""))
    cases.append(("wrong method", "PUT", "/edit", j, body))
    cases.append(("HEAD query", "HEAD", "/query", {}, b""))
    cases.append(("unknown route", "POST", "/admin/flush", j, b"{}"))
    return cases


def run(examples: int, workdir: Path | None = None) -> dict:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mend-hostile-"))
    red = RedisProc(workdir / "redis").start()
    prefix = f"host-{uuid.uuid4().hex[:6]}"
    svc = ServiceProc(workdir, tiny_model_dir(workdir), red.url, prefix, api_keys=KEYS,
                      max_body_bytes=MAX_BODY)
    rc = red.client()
    problems: list[str] = []
    statuses: Counter = Counter()
    by_op: Counter = Counter()
    lat: list[float] = []
    journal_changes = 0
    generated = 0

    def head() -> bytes | None:
        return rc.get(f"{prefix}:{fingerprint}:head")

    def check(label: str, status: int, text: str, before: bytes | None, ms: float) -> None:
        nonlocal journal_changes
        statuses[status] += 1
        lat.append(ms)
        after = head()
        if after != before:
            journal_changes += 1
            if status != 200:
                problems.append(f"{label}: refused with {status} but the journal changed")
        if status >= 500:
            problems.append(f"{label}: {status} {text[:300]}")

    try:
        svc.start()
        fingerprint = svc.wait_ready()["fingerprint"]
        schema = schemathesis.openapi.from_url(f"{svc.base}/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        session = httpx.Client(base_url=svc.base, timeout=120)
        def fuzz(op, mode, who: str, hdrs: dict, n: int) -> None:
            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def send(case):
                nonlocal generated
                kwargs = case.as_transport_kwargs(base_url=svc.base, headers=dict(hdrs))
                if op.path == "/events" and isinstance(kwargs.get("params") or {}, dict):
                    kwargs["params"] = (kwargs.get("params") or {}) | {"max_s": 1}  # a stream lasts max_s
                req_headers = {k: v for k, v in (kwargs.get("headers") or {}).items()
                               if k.lower() != "authorization"} | hdrs
                before = head()
                t0 = time.perf_counter()
                try:
                    r = session.request(kwargs["method"], kwargs["url"], headers=req_headers,
                                        params=kwargs.get("params"), json=kwargs.get("json"),
                                        content=kwargs.get("data") if kwargs.get("json") is None else None)
                except (httpx.LocalProtocolError, UnicodeEncodeError, TypeError):
                    return  # the client itself cannot send it (e.g. a header with a newline)
                generated += 1
                by_op[f"{op.method.upper()} {op.path}"] += 1
                check(f"{op.method.upper()} {case.formatted_path} [{mode.value}, {who}]", r.status_code,
                      r.text, before, (time.perf_counter() - t0) * 1000)

            try:
                send()
            except Unsatisfiable:
                pass  # nothing to violate (e.g. negative mode of an operation without parameters)

        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for who, hdrs in AUTH.items():
                    n = examples
                    if op.path == "/edit" and who == "admin" and mode == GenerationMode.POSITIVE:
                        n = max(2, examples // 4)  # valid edits really run FT: keep them few
                    if op.path == "/events" and mode == GenerationMode.POSITIVE:
                        n = min(n, 2)  # each accepted request streams for a second
                    fuzz(op, mode, who, hdrs, n)
        manual = manual_cases()
        closed: list[str] = []
        manual_status: dict[str, int] = {}
        for name, method, path, hdrs, raw in manual:
            before = head()
            t0 = time.perf_counter()
            headers = dict(hdrs) | AUTH["admin"]
            content = raw
            if raw.startswith(b"chunked:"):
                content = iter([raw[8:][i:i + 65536] for i in range(0, len(raw) - 8, 65536)])
            try:
                with httpx.Client(base_url=svc.base, timeout=120) as one:  # a fresh connection each
                    r = one.request(method, path, headers=headers, content=content)
            except httpx.TransportError as err:
                closed.append(f"{name}: {type(err).__name__}")
                continue
            check(f"manual: {name}", r.status_code, r.text, before, (time.perf_counter() - t0) * 1000)
            manual_status[name] = r.status_code
            if name.startswith("1 MB") and r.status_code != 413:
                problems.append(f"manual: {name}: {r.status_code}, expected 413")
        status, body = svc.ready_body()
        if status != 200:
            problems.append(f"service not ready after the run: {body}")
        session.close()
    finally:
        svc.stop()
        red.stop()
    return {"generated_requests": generated, "manual_requests": len(manual),
            "manual_statuses": manual_status, "manual_connection_closed": closed, "by_operation": dict(by_op),
            "statuses": dict(sorted(statuses.items())), "5xx": sum(v for k, v in statuses.items() if k >= 500),
            "journal_changes_by_accepted_edits": journal_changes, "latency": percentiles(lat),
            "problems": problems[:50], "problem_count": len(problems), "workdir": str(workdir)}


def main() -> int:
    return scenario_main("hostile input", run, __doc__, CI, FULL, full_help=">= 1,000 generated requests")


if __name__ == "__main__":
    sys.exit(main())
