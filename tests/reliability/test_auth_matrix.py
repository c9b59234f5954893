"""Scenario 6: the full route x caller matrix against a real `mend serve`, no key in its DEBUG log;
keys compared with hmac.compare_digest against every configured key, never looked up by value."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scenarios import auth

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from mend_harness import make_settings, serving  # noqa: E402

import service.api.auth as auth_module  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_every_route_every_caller_and_no_key_in_the_log(tmp_path):
    figures = auth.run(workdir=tmp_path)
    assert not figures["problems"], figures["problems"]
    assert figures["calls"] == len(auth.ROUTES) * len(auth.CALLERS) and figures["log_lines"] > 20


class _NoLookup(dict):
    """Keys that may only be iterated: a lookup by the presented value would not be constant time."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("API keys looked up by value (a dict/set lookup is not constant time)")

    __contains__ = get = __getitem__ = _refuse


def test_keys_are_compared_in_constant_time_against_every_key(tiny_tokenizer, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = auth_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    with serving(make_settings(api_keys=auth.KEYS), tiny_tokenizer) as c:
        c.app.state.runtime.settings.api_keys = _NoLookup(c.app.state.runtime.settings.api_keys)
        for who, status in [("reader", 200), ("admin", 200), ("invalid", 401), ("near-miss", 401)]:
            calls.clear()
            r = c.get("/edits", headers=auth.headers_of(who))
            assert r.status_code == status, r.text
            assert len(calls) == len(auth.KEYS)  # no early exit on a match or a mismatch
            assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
